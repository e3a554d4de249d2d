"""Ctrl-C held back while the main thread holds a node's connection.

A node's requests read their answers on the caller's thread, the main thread included. A
KeyboardInterrupt raised there at the wrong moment would lose what the connection was in
the middle of: bytes taken off the socket and not yet handled (the node then drops its
connection, and the loader passes its other threads' compute leases on), a change read but
not applied, half a frame sent, or the lock of the connection's reading never released.

Python runs SIGINT's handler on the main thread, between two bytecodes, and the handler
raises KeyboardInterrupt. :func:`hold` wraps that handler (again, if something set another
since: ipykernel sets Python's own before each request it handles): while the main thread
is inside :func:`hold` ... :func:`release`, a SIGINT is noted instead, and raised at the
next safe point (:func:`check`) or when the section ends. A blocking read inside a section goes
on to its timeout (a quarter of a second), so Ctrl-C still ends a wait at once, near enough.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["check", "hold", "release"]

try:  # signal.getsignal maps the handler to an enum, by way of an exception: 3 us a call
    from _signal import getsignal as _getsignal  # type: ignore[import-not-found]
except ImportError:  # not CPython
    _getsignal = signal.getsignal

_MAIN = threading.main_thread().ident
_SIGINT = int(signal.SIGINT)


class _State:
    depth = 0  # sections the main thread is inside
    noted: tuple[int, FrameType | None] | None = None  # a SIGINT that came meanwhile
    previous: Any = None  # the handler wrapped


_state = _State()


def _handler(signum: int, frame: FrameType | None) -> Any:
    if _state.depth:
        _state.noted = (signum, frame)
        return None
    return _state.previous(signum, frame)


def _wrap() -> None:
    """Wrap SIGINT's handler, if it is Python's (or another Python function) and not ours."""
    current = _getsignal(_SIGINT)
    if current is not _handler and callable(current):
        _state.previous = current
        signal.signal(signal.SIGINT, _handler)


def hold() -> None:
    """Enter a section that Ctrl-C must not cut (on the main thread; elsewhere nothing)."""
    if threading.get_ident() == _MAIN:
        if not _state.depth:
            _wrap()
        _state.depth += 1


def release() -> None:
    """Leave a section; at the outermost, raise the Ctrl-C that came meanwhile."""
    if threading.get_ident() == _MAIN:
        _state.depth -= 1
        if not _state.depth:
            _deliver()


def check() -> None:
    """A safe point inside a section: raise the Ctrl-C that came meanwhile, now."""
    if threading.get_ident() == _MAIN:
        _deliver()


def _deliver() -> None:
    noted, _state.noted = _state.noted, None
    if noted is not None and _state.previous is not None:
        _state.previous(*noted)
