"""A big ``bytes`` value made in huge pages, straight from the network or from a buffer.

Unpickling a big bytes value copies it into a new bytes object, whose memory malloc maps
fresh in 4 KiB pages: on a 100 MB value the page faults cost several times the copy itself.
A :class:`Landing` makes the bytes object first (``PyBytes_FromStringAndSize`` with no
data, as CPython's own C code does before anyone else can see it, here through ctypes),
maps its pages ahead in huge pages while they are cheap (:mod:`clustorage.fresh_memory`),
and is filled in place:

- a member receives a big bytes value straight into one (``bulk.ArrivingFrame``): no
  receive buffer to fault in and no copy out of it. On a virtual machine the first touch of
  memory the guest has not used lately costs the host's fault too: a 100 MB first get took
  139-174 ms with a receive buffer and a copy, 82-114 ms landing in place;
- :func:`copy_to_bytes` copies one out of a writable buffer it arrived in (the loader's).

Where that is not possible (not CPython, a read-only source) the value is unpickled as
usual; without THP the bytes object is made all the same.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Callable
from time import thread_time
from typing import Any

from .fresh_memory import PagesAhead

__all__ = [
    "BIG_BYTES_END",
    "BIG_BYTES_HEAD",
    "CAN_LAND",
    "COPY_AT",
    "HEAD_SIZE",
    "Landing",
    "copy_to_bytes",
    "landing_size",
]

COPY_AT = 1 << 23  # bytes: below this, huge pages save too little to matter
# A payload that is one big pickled bytes and nothing else (protocol 5): PROTO, BINBYTES
# and its 4-byte length, the bytes, MEMOIZE, STOP.
BIG_BYTES_HEAD = b"\x80\x05B"
BIG_BYTES_END = b"\x94."
HEAD_SIZE = len(BIG_BYTES_HEAD) + 4
_DATA_OFFSET = bytes.__basicsize__ - 1  # where a bytes object's data starts (ob_sval)


def _tools() -> tuple[Any, Any] | None:
    """Prototypes of our own: ``ctypes.pythonapi``'s functions are shared by the whole
    process, and another library may set their result type to something else."""
    if platform.python_implementation() != "CPython":
        return None
    try:
        new_bytes = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)(
            ("PyBytes_FromStringAndSize", ctypes.pythonapi)
        )
        madvise = ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, use_errno=True
        )(("madvise", ctypes.CDLL(None)))
    except (AttributeError, OSError):
        return None
    return new_bytes, madvise


_TOOLS = _tools()
CAN_LAND = _TOOLS is not None  # whether a value can be received into a bytes object (Landing)


def landing_size(head: bytes | memoryview, blob: int) -> int | None:
    """The size of the bytes value a payload of ``blob`` bytes holds, from its first
    HEAD_SIZE bytes, if it is one big pickled bytes (see :class:`Landing`); else None."""
    if blob < COPY_AT or bytes(head[:3]) != BIG_BYTES_HEAD:
        return None
    size = int.from_bytes(head[3:HEAD_SIZE], "little")
    return size if size == blob - HEAD_SIZE - len(BIG_BYTES_END) else None


class Landing(PagesAhead):
    """A new bytes object of ``size`` bytes (``value``) that a big bytes value arriving is
    received straight into (``view``, writable), before anyone else can see it: no receive
    buffer to fault in and copy out of. Its pages are mapped ahead as for a receive buffer
    (:class:`~clustorage.fresh_memory.PagesAhead`)."""

    def __init__(self, size: int, clock: Callable[[], float] = thread_time) -> None:
        assert _TOOLS is not None, "landing_size says whether a value can land"
        new_bytes, self._libc_madvise = _TOOLS
        self.value: bytes = new_bytes(None, size)
        if type(self.value) is not bytes or len(self.value) != size:
            raise MemoryError(f"no bytes object of {size} bytes")
        start = id(self.value) + _DATA_OFFSET
        memory = (ctypes.c_char * size).from_address(start)
        # A view of it (a part on a hashing thread) keeps the bytes object alive.
        memory.owner = self.value  # type: ignore[attr-defined]
        self.view = memoryview(memory).cast("B")
        super().__init__(start, size, clock)

    def _madvise(self, advice: int, address: int, length: int) -> None:
        if self._libc_madvise(address, length, advice) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    def _touch(self, address: int) -> None:
        cell = ctypes.c_ubyte.from_address(address)
        cell.value = cell.value


def copy_to_bytes(source: memoryview) -> bytes | None:
    """A new bytes object with ``source``'s bytes (a writable, contiguous byte view of at
    least COPY_AT bytes), its pages mapped first as a :class:`Landing`'s are; None where
    that cannot be done (then copy it as usual)."""
    size = source.nbytes
    if not CAN_LAND or size < COPY_AT or source.readonly or not source.c_contiguous:
        return None
    try:
        land = Landing(size, thread_time)
    except MemoryError:
        return None
    land.map_until(size)
    land.view[:] = source.cast("B")
    return land.value
