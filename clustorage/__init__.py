"""Clustorage: a value computed once for the whole cluster, a function defined once and
hot-loaded into every node (shells, scripts and Jupyter kernels).

>>> import clustorage
>>> clustorage.start(name="app1")                       # no loader named: this is the loader
>>> clustorage.get("hello", lambda: "world")
'world'
>>> clustorage.call("sum", [1, 4], lambda: "def sum(a, b):\\n    return a + b\\n")
5
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Self

from .config import Cookie, LoaderAddress
from .errors import (
    AuthenticationError,
    ClustorageError,
    CompileError,
    ConfigError,
    DeadlockError,
    LeaseLost,
    LoaderUnavailable,
    NameClashError,
    NotFound,
    ProtocolError,
    RemoteError,
    StoreError,
    ValueTooLarge,
)
from .keys import Key
from .node import Definition, Source
from .node import Node as _Node
from .probe import Probe
from .replica import LoadEvent
from .tls_init import init_tls

__all__ = [
    "AuthenticationError",
    "ClustorageError",
    "CompileError",
    "ConfigError",
    "DeadlockError",
    "Definition",
    "LeaseLost",
    "LoadEvent",
    "LoaderUnavailable",
    "NameClashError",
    "Node",
    "NotFound",
    "Probe",
    "ProtocolError",
    "RemoteError",
    "StoreError",
    "ValueTooLarge",
    "call",
    "default_node",
    "define",
    "functions",
    "get",
    "init_tls",
    "start",
    "stop",
]

__version__ = "0.1.0"

# Kept when the module is run again (importlib.reload, as %reload_ext does): the node it
# started still runs, and only its name here would be lost.
_default: Node | None = globals().get("_default")
_default_lock: threading.Lock = globals().get("_default_lock") or threading.Lock()
_entered: list[Node] = globals().get("_entered", [])  # in a ``with`` block, innermost last


class Node(_Node):
    __doc__ = _Node.__doc__

    def __enter__(self) -> Self:
        _entered.append(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self in _entered:
            _entered.remove(self)
        super().__exit__(exc_type, exc, tb)


def start(
    name: str | None = None,
    loader: str | LoaderAddress | None = None,
    *,
    cookie: str | bytes | Cookie | None = None,
    cookie_file: str | os.PathLike[str] | None = None,
    listen: str | tuple[str, int] | None = None,
    data: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    dead_after: float | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    tls_ca: str | os.PathLike[str] | None = None,
) -> Node:
    """Start this process's default node (see :class:`Node` for the arguments).

    Raises:
        RuntimeError: a default node is already running; call stop() first.
    """
    global _default
    with _default_lock:
        if _default is not None:
            raise RuntimeError(
                f"this process already runs node {_default.name!r}; call clustorage.stop() first"
            )
        _default = Node(
            name,
            loader,
            cookie=cookie,
            cookie_file=cookie_file,
            listen=listen,
            data=data,
            timeout=timeout,
            dead_after=dead_after,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_ca=tls_ca,
        )
        return _default


def default_node() -> Node | None:
    """The node started by :func:`start`, if any."""
    return _default


def _node() -> Node:
    node = _default
    if node is None:
        raise RuntimeError("no clustorage node is running: call clustorage.start(...) first")
    return node


def stop() -> None:
    """Stop the default node, if one runs."""
    global _default
    with _default_lock:
        node, _default = _default, None
    if node is not None:
        node.stop()


def get(key: Key, fn: Callable[[], Any] | None = None) -> Any:
    """:meth:`Node.get` on the default node."""
    node = _default
    if node is not None:
        try:
            return node._values[key]  # type: ignore[index]  # the hit, inlined: SPEC "get" 1
        except (KeyError, TypeError):
            pass
    __tracebackhide__ = True
    return _node().get(key, fn)


def call(name: str, args: Iterable[Any] = (), fn: Source | None = None) -> Any:
    """:meth:`Node.call` on the default node."""
    node = _default
    if node is not None:
        function = node._functions.get(name)  # the hit, inlined: SPEC "call" 1
        if function is not None:
            return function(*args)
    __tracebackhide__ = True
    return _node().call(name, args, fn)


def define(name: str, source: Source, force: bool = True) -> Definition:
    """:meth:`Node.define` on the default node."""
    return _node().define(name, source, force)


def _functions_node() -> Node:
    """The node ``clustorage.functions`` reads: the default node, else the innermost one
    in a ``with clustorage.Node(...)`` block."""
    node = _default
    if node is None:
        node = next((entered for entered in reversed(_entered) if not entered.stopped), None)
    if node is None:
        raise RuntimeError(
            "no clustorage node is running: call clustorage.start(...) first, "
            "or use clustorage.functions inside 'with clustorage.Node(...)'"
        )
    return node


class _Functions:
    """``clustorage.functions.NAME``: function NAME as loaded on the default node (or, without
    one, on the node of the innermost ``with clustorage.Node(...)`` block)."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return _functions_node().function(name)
        except NotFound as exc:
            raise AttributeError(str(exc)) from None

    def __dir__(self) -> list[str]:
        try:
            return _functions_node().functions()
        except RuntimeError:
            return []

    def __repr__(self) -> str:
        return f"<clustorage.functions: {', '.join(self.__dir__()) or 'none loaded'}>"


functions = _Functions()


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext clustorage``: register the magics (and start the node if configured)."""
    from .magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .magics import unload_ipython_extension as unload

    unload(ipython)
