"""Key rules: what a value's key may be (SPEC "Python API")."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Key", "normalize_key", "printable", "unencodable"]

Key = str | Sequence[str | int]


def printable(text: object) -> str:
    """``text`` with control characters, lone surrogates and other unprintable characters
    escaped (``\\n``, ``\\x1b``, ``\\ud800``): how a peer's text goes into a log line, so that
    it cannot forge or garble log lines."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def unencodable(text: str) -> str | None:
    """Why ``text`` cannot be stored (it is not valid Unicode: a lone surrogate), or None."""
    if text.isascii():
        return None
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return (
            f"'{printable(text)}' holds a lone surrogate ({ascii(text[exc.start])[1:-1]} at "
            f"position {exc.start}), which is not text that can be stored"
        )
    return None


def normalize_key(key: object) -> str:
    """The canonical string of a key: a string as is, list or tuple parts joined by '.'.

    Raises:
        TypeError: the key is not a string or a sequence of strings and integers.
        ValueError: the key, or one of its parts, is empty.
    """
    if isinstance(key, str):
        if not key:
            raise ValueError("a key cannot be empty: use a name such as 'hello'")
        if (problem := unencodable(key)) is not None:
            raise ValueError(f"key {problem}; use valid text (decode bytes before using them)")
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
        return normalize_key(".".join(parts))
    raise TypeError(
        f"a key must be a str or a list of str/int parts (like ['user', 42]), "
        f"not a {type(key).__name__}"
    )
