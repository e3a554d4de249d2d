"""A file mapped read-only that holds no file descriptor.

``mmap.mmap`` keeps a duplicate of the file's descriptor for as long as the mapping lives
(before Python 3.13's ``trackfd``), so a loader holding a thousand big payloads mapped from
their files would hold a thousand descriptors, and run out of them under a common limit of
1024. The kernel needs no descriptor to keep a mapping: :func:`map_read_only` maps the file
with the C library's ``mmap``, closes nothing but what it opened, and unmaps the memory once
the last view of it is dropped.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref

__all__ = ["map_read_only"]

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = ctypes.CFUNCTYPE(
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
    use_errno=True,
)(("mmap", _libc))
_munmap = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)(("munmap", _libc))
_FAILED = ctypes.c_void_p(-1).value


def _size_class(size: int) -> int:
    """``size`` rounded up to one of 16 sizes per power of two: ctypes keeps every array
    type it makes, one per length, for the life of the process."""
    step = 1 << max(size.bit_length() - 4, 12)
    return -(-size // step) * step


def map_read_only(fd: int, size: int) -> memoryview:
    """The first ``size`` bytes (> 0) of open file ``fd``, mapped read-only and shared; the
    mapping outlives ``fd``. Reading past the file's end, if it is cut short meanwhile,
    raises SIGBUS, as with ``mmap.mmap``.

    Raises:
        OSError: the kernel refused the mapping.
    """
    length = _size_class(size)  # reserved, not read: only the first ``size`` bytes are seen
    address = _mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address is None or address == _FAILED:
        code = ctypes.get_errno()
        raise OSError(code, f"cannot map a file of {size} bytes: {os.strerror(code)}")
    memory = (ctypes.c_char * length).from_address(address)
    # Not at exit: daemon threads (the loop, hashing threads) may still read it then; the
    # process's end unmaps it anyway.
    weakref.finalize(memory, _munmap, address, length).atexit = False
    return memoryview(memory).cast("B")[:size].toreadonly()
