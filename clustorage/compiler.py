"""Function source to a callable, as the loader compiles it (SPEC "call" 3-5)."""

from __future__ import annotations

import builtins
import keyword
import linecache
import textwrap
import traceback
import types
from collections.abc import Callable
from typing import Any

from .errors import CompileError

__all__ = [
    "check_function_name",
    "compile_function",
    "filename",
    "register_source",
    "restore_filename",
]

MODULE = "__cluster__"


def filename(name: str) -> str:
    """The file name tracebacks show for function ``name``."""
    return f"<cluster:{name}>"


def check_function_name(name: str) -> str:
    """Return ``name`` if it can name a function, else raise ValueError (SPEC "call" 8).

    A Python keyword (``def``, ``None``, ``True`` ...) is refused: no namespace could bind it.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"invalid function name {name!r}: use a Python identifier such as 'sum'")
    if keyword.iskeyword(name):
        raise ValueError(
            f"invalid function name {name!r}: it is a Python keyword; choose another name"
        )
    return name


def register_source(name: str, source: str) -> None:
    """Make tracebacks through ``<cluster:NAME>`` show ``source``'s lines (SPEC "call" 5)."""
    path = filename(name)
    linecache.cache[path] = (len(source), None, source.splitlines(keepends=True), path)


def _error_line(exc: BaseException, path: str) -> int | None:
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == path:
            return lineno
    return None


def compile_function(name: str, source: str) -> Callable[..., Any]:
    """Compile ``source`` (a ``def NAME`` block or an expression) into the callable ``name``.

    Raises:
        CompileError: the source does not parse, fails when run, or defines no callable ``name``.
    """
    check_function_name(name)
    path = filename(name)
    source = textwrap.dedent(source).strip("\n") + "\n"
    register_source(name, source)
    namespace: dict[str, Any] = {"__name__": MODULE, "__builtins__": builtins}
    try:
        code = compile(source, path, "eval")
    except SyntaxError:
        code = None
    try:
        if code is None:
            code = compile(source, path, "exec")
            exec(code, namespace)
            function = namespace.get(name)
        else:
            function = eval(code, namespace)
            if callable(function) and getattr(function, "__name__", None) == "<lambda>":
                function.__name__ = function.__qualname__ = name
    except SyntaxError as exc:
        raise CompileError(
            exc.msg, name=name, lineno=exc.lineno, offset=exc.offset, text=exc.text
        ) from None
    except (Exception, SystemExit) as exc:
        lineno = _error_line(exc, path)
        lines = source.splitlines()
        text = lines[lineno - 1] if lineno and lineno <= len(lines) else None
        raise CompileError(
            f"{type(exc).__name__}: {exc}", name=name, lineno=lineno, text=text
        ) from None
    if not callable(function):
        raise CompileError(
            f"the source does not define a function {name!r}: write 'def {name}(...):' "
            f"or an expression such as 'lambda a, b: a + b'",
            name=name,
        )
    return function  # type: ignore[no-any-return]


def _code_with_filename(code: types.CodeType, path: str) -> types.CodeType:
    consts = tuple(
        _code_with_filename(const, path) if isinstance(const, types.CodeType) else const
        for const in code.co_consts
    )
    return code.replace(co_filename=path, co_consts=consts)


def restore_filename(name: str, function: Any) -> Any:
    """Point a received function's code back at ``<cluster:NAME>``.

    cloudpickle sends code with a neutral file name; tracebacks need ours to find the source.
    """
    if isinstance(function, types.FunctionType):
        function.__code__ = _code_with_filename(function.__code__, filename(name))
    return function
