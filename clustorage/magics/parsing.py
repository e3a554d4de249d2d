"""Reading a magic's line: its head word, Python expressions, function names."""

from __future__ import annotations

import io
import keyword
import tokenize
from types import CodeType

from IPython.core.error import UsageError

__all__ = [
    "check_function_name",
    "check_no_option",
    "expression",
    "head",
    "key_head",
    "split_arguments",
]

_OPEN, _CLOSE = "([{", ")]}"
_SKIP = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


def split_arguments(text: str) -> list[str]:
    """Split ``text`` into Python expressions separated by spaces outside brackets and strings.

    >>> split_arguments("1 'a b' [x, y] f(2, 3) -4")
    ['1', "'a b'", '[x, y]', 'f(2, 3)', '-4']

    Raises:
        UsageError: ``text`` cannot be tokenized (an unclosed bracket or string).
    """
    text = text.strip()
    spans: list[list[int]] = []
    depth = 0
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type in _SKIP:
                continue
            if token.type == tokenize.COMMENT:
                break
            start, end = token.start[1], token.end[1]
            if spans and (depth > 0 or start == spans[-1][1]):
                spans[-1][1] = end
            else:
                spans.append([start, end])
            if token.type == tokenize.OP and token.string in _OPEN:
                depth += 1
            elif token.type == tokenize.OP and token.string in _CLOSE:
                depth = max(depth - 1, 0)
    except (tokenize.TokenError, SyntaxError) as exc:
        raise UsageError(f"cannot read the arguments {text!r}: {exc.args[0]}") from None
    return [text[start:end] for start, end in spans]


def expression(source: str, what: str) -> CodeType:
    """``source`` compiled as one Python expression; ``what`` names it in the error."""
    try:
        return compile(source, f"<{what}>", "eval")
    except SyntaxError as exc:
        raise UsageError(
            f"{what} {source!r} is not a Python expression ({exc.msg}); separate arguments "
            f"with spaces and put one that has spaces in parentheses, as in (x + 1)"
        ) from None


def head(line: str) -> tuple[str, str]:
    """``"KEY rest of line"`` -> ``("KEY", "rest of line")``."""
    parts = line.strip().split(None, 1)
    return (parts[0] if parts else ""), (parts[1] if len(parts) > 1 else "")


def key_head(line: str) -> tuple[str, str, bool]:
    """As :func:`head`, for a line that starts with a KEY, which may be quoted (``'a key'``,
    ``"a key"``, as Python would write it): ``(KEY, rest, quoted)``, the quotes left out.

    Raises:
        UsageError: a quote is opened and not closed.
    """
    stripped = line.strip()
    quote = stripped[:1]
    if quote not in ("'", '"'):
        return (*head(stripped), False)
    end = stripped.find(quote, 1)
    if end < 0:
        raise UsageError(
            f"the KEY {stripped.split(None, 1)[0]} opens a quote it does not close: "
            f"write it as {quote}KEY{quote}, or without quotes"
        )
    return stripped[1:end], stripped[end + 1 :].strip(), True


def check_no_option(magic: str, first: str, usage: str) -> None:
    """``first``, the first word of a ``%magic`` line, is not a mistyped option (argparse
    would only say that the positional arguments are missing).

    Raises:
        UsageError: it starts with "-" and is not -h or --help.
    """
    if first.startswith("-") and first not in ("-h", "--help"):
        raise UsageError(f"%{magic} has no option {first}: use %{magic} {usage} (see %{magic}?)")


def check_function_name(name: str) -> str:
    """``name`` if it can name a cluster function (SPEC "call" 8), else ``UsageError``."""
    if not name.isidentifier():
        raise UsageError(f"invalid function name {name!r}: use a Python identifier such as sum")
    if keyword.iskeyword(name):
        raise UsageError(
            f"invalid function name {name!r}: it is a Python keyword; choose another name"
        )
    return name
