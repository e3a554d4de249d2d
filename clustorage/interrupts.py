"""Ctrl-C held back while the main thread holds a node's connection.

A node's requests read their answers on the caller's thread, the main thread included. A
KeyboardInterrupt raised there at the wrong moment would lose what the connection was in
the middle of: bytes taken off the socket and not yet handled (the node then drops its
connection, and the loader passes its other threads' compute leases on), a change read but
not applied, half a frame sent, or the lock of the connection's reading never released.

Python runs SIGINT's handler on the main thread, between two bytecodes, and the handler
raises KeyboardInterrupt. While the main thread is inside :func:`hold` ... :func:`release`,
SIGINT's handler is one that notes the signal instead, and the handler that was there is
back as the outermost section ends: then it is called with the noted signal, or at the next
safe point (:func:`check`) before. Outside sections nothing of this module is in place, so a
handler installed later that passes the signal on to the one before it never meets ours.
A blocking read inside a section goes on to its timeout (a quarter of a second), so Ctrl-C
still ends a wait at once, near enough.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["check", "hold", "release"]

# signal.getsignal and signal.signal map handlers to enums (getsignal by way of a caught
# exception): 3 us and 8 us a call, against 25 ns and 0.6 us for the C functions they wrap.
try:
    from _signal import getsignal as _getsignal  # type: ignore[import-not-found]
    from _signal import signal as _setsignal
except ImportError:  # not CPython
    _getsignal, _setsignal = signal.getsignal, signal.signal

_MAIN = threading.main_thread().ident
_SIGINT = int(signal.SIGINT)


class _State:
    depth = 0  # sections the main thread is inside
    noted: tuple[int, FrameType | None] | None = None  # a SIGINT that came meanwhile
    previous: Any = None  # the handler ours stands in for, while it does


_state = _State()


def _handler(signum: int, frame: FrameType | None) -> None:
    _state.noted = (signum, frame)


def hold() -> None:
    """Enter a section that Ctrl-C must not cut (on the main thread; elsewhere nothing)."""
    if threading.get_ident() != _MAIN:
        return
    if not _state.depth:
        current = _getsignal(_SIGINT)
        if callable(current) and current is not _handler:  # else SIGINT is not Python's
            _state.previous = current
            _setsignal(_SIGINT, _handler)
    _state.depth += 1


def release() -> None:
    """Leave a section; at the outermost, put SIGINT's handler back and raise the Ctrl-C
    that came meanwhile."""
    __tracebackhide__ = True
    if threading.get_ident() != _MAIN:
        return
    _state.depth -= 1
    if not _state.depth and _state.previous is not None:
        previous, _state.previous = _state.previous, None
        if _getsignal(_SIGINT) is _handler:  # else somebody set theirs meanwhile: it stays
            _setsignal(_SIGINT, previous)
        _deliver(previous)


def check() -> None:
    """A safe point inside a section: raise the Ctrl-C that came meanwhile, now."""
    __tracebackhide__ = True
    if threading.get_ident() == _MAIN and _state.previous is not None:
        _deliver(_state.previous)


def _deliver(handler: Any) -> None:
    __tracebackhide__ = True
    noted, _state.noted = _state.noted, None
    if noted is not None:
        handler(*noted)
