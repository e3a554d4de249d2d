"""Key rules: a string stays, parts join with '.', empty and odd parts are refused."""

from __future__ import annotations

import pytest

from clustorage.keys import normalize_key


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("hello", "hello"),
        ("user.42", "user.42"),
        (["user", 42], "user.42"),
        (("user", 42), "user.42"),
        (["a"], "a"),
        ([1, 2, 3], "1.2.3"),
        (["user", -1], "user.-1"),
        ("with space", "with space"),
    ],
)
def test_valid_keys(key: object, expected: str) -> None:
    """Strings stay as they are; list and tuple parts are joined with '.'."""
    assert normalize_key(key) == expected


@pytest.mark.parametrize("key", ["", [], (), ["user", ""], ["", 1]])
def test_empty_key_or_part_is_a_value_error(key: object) -> None:
    """An empty key, an empty list or an empty part raises ValueError."""
    with pytest.raises(ValueError, match="empty"):
        normalize_key(key)


@pytest.mark.parametrize(
    ("part", "shown"),
    [(True, "True"), (False, "False"), (1.5, "1.5"), (None, "None"), ({"a": 1}, "{'a': 1}")],
)
def test_odd_part_is_a_type_error_naming_it(part: object, shown: str) -> None:
    """A bool, float, None or dict part raises TypeError whose message names the part."""
    with pytest.raises(TypeError) as info:
        normalize_key(["user", part])
    message = str(info.value)
    assert shown in message
    assert type(part).__name__ in message


@pytest.mark.parametrize("key", [42, None, 1.5, b"bytes", {"user": 42}, {"user"}, True])
def test_key_of_wrong_type_is_a_type_error(key: object) -> None:
    """A key that is neither a string nor a list/tuple raises TypeError naming its type."""
    with pytest.raises(TypeError, match=type(key).__name__):
        normalize_key(key)
