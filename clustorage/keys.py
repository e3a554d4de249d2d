"""Key rules: what a value's key may be (SPEC "Python API")."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Key", "normalize_key"]

Key = str | Sequence[str | int]


def normalize_key(key: object) -> str:
    """The canonical string of a key: a string as is, list or tuple parts joined by '.'.

    Raises:
        TypeError: the key is not a string or a sequence of strings and integers.
        ValueError: the key, or one of its parts, is empty.
    """
    if isinstance(key, str):
        if not key:
            raise ValueError("a key cannot be empty: use a name such as 'hello'")
        return key
    if isinstance(key, list | tuple):
        if not key:
            raise ValueError("a key cannot be an empty list: give at least one part")
        parts = []
        for part in key:
            if isinstance(part, bool) or not isinstance(part, str | int):
                raise TypeError(
                    f"key part {part!r} is a {type(part).__name__}: parts must be str or int"
                )
            text = str(part)
            if not text:
                raise ValueError(f"key {key!r} has an empty part")
            parts.append(text)
        return ".".join(parts)
    raise TypeError(
        f"a key must be a str or a list of str/int parts (like ['user', 42]), "
        f"not a {type(key).__name__}"
    )
