"""A big ``bytes`` value made in huge pages, from the buffer it arrived in.

Unpickling a big bytes value copies it into a new bytes object, whose memory malloc maps
fresh in 4 KiB pages: on a 100 MB value the page faults cost several times the copy itself
(80-100 ms against about 20 ms). :func:`copy_to_bytes` makes the bytes object first, asks
the kernel for huge pages under it (Linux THP, ``MADV_HUGEPAGE``) before anything touches
them, then copies the value in: a fault per 2 MiB instead of per 4 KiB (unless huge pages
prove dearer here as it copies: see :mod:`clustorage.fresh_memory`).

This is what CPython's own C code does with a bytes object (``PyBytes_FromStringAndSize``
with no data, then filling it) before anyone else can see it, done here through ctypes.
Where that is not possible (not CPython, a read-only source) :func:`copy_to_bytes` returns
None and the caller unpickles as usual; without THP it makes the bytes object all the same.

A source that nobody will read again (``release``: a member's answer, arrived into fresh
memory) is given back to the system page by page as it is copied (``MADV_DONTNEED``), so that
the value's pages, faulted in as the copy goes, are those same pages again. On a virtual
machine the first touch of memory the guest has not used lately costs the host's fault too,
several times the copy (a 100 MB value: 120-290 ms copied into fresh memory, 35-60 ms
releasing as it goes); and the process holds one copy of the value instead of two.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
from time import thread_time
from typing import Any

from .bulk import OWNED_AT
from .fresh_memory import HUGE_BY_DEFAULT, HUGE_PAGE, HugePageCost, to_huge_page_end

__all__ = ["COPY_AT", "copy_to_bytes"]

COPY_AT = OWNED_AT  # bytes: below this, huge pages save too little to matter
_PAGE = mmap.PAGESIZE
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


def copy_to_bytes(
    source: memoryview, *, release: bool = False, huge_pages: bool = True
) -> bytes | None:
    """A new bytes object with ``source``'s bytes (a writable, contiguous byte view of at
    least COPY_AT bytes), in huge pages; None where that cannot be done (then copy it as
    usual). ``release``: ``source``'s whole pages are given back as they are copied, and
    read as zeros afterwards (only for memory nothing else reads). ``huge_pages``: False
    when they were just found dear (then 4 KiB pages from the start)."""
    size = source.nbytes
    if _TOOLS is None or size < COPY_AT or source.readonly or not source.c_contiguous:
        return None
    new_bytes, madvise = _TOOLS
    value = new_bytes(None, size)
    if type(value) is not bytes or len(value) != size:
        return None
    start = id(value) + _DATA_OFFSET
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    last = (start + size) // HUGE_PAGE * HUGE_PAGE
    cost = HugePageCost()
    if last <= first:
        cost.cheap = False
    elif cost.cheap:  # the kernel has them; a refusal leaves the pages as they were
        cost.cheap = huge_pages
        # Advice outlives the object where malloc keeps the memory: none unless needed.
        if huge_pages or HUGE_BY_DEFAULT:
            advice = mmap.MADV_HUGEPAGE if huge_pages else mmap.MADV_NOHUGEPAGE
            madvise(first, last - first, advice)
    origin = ctypes.c_char.from_buffer(source)
    try:
        _copy(madvise, start, ctypes.addressof(origin), size, cost, release)
    finally:
        del origin  # lets the source's owner be closed or resized again
    return value


def _copy(
    madvise: Any, target: int, source: int, size: int, cost: HugePageCost, release: bool
) -> None:
    """Copy ``size`` bytes from ``source`` to ``target`` a huge page of the target at a
    time, each timed: two slow ones in a row turn the rest to 4 KiB pages. ``release``:
    each whole page of the source is given back once it is copied."""
    released = -(-source // _PAGE) * _PAGE  # a page partly outside the source stays
    done = 0
    while done < size:
        step = min(size - done, to_huge_page_end(target + done))
        began = thread_time()
        ctypes.memmove(target + done, source + done, step)
        took = thread_time() - began
        done += step
        if release:
            copied = (source + done) // _PAGE * _PAGE
            if copied > released:
                madvise(released, copied - released, mmap.MADV_DONTNEED)
                released = copied
        if cost.cheap and step == HUGE_PAGE and not cost.took(took):
            rest = target + done
            end = (target + size) // HUGE_PAGE * HUGE_PAGE
            if end > rest:
                madvise(rest, end - rest, mmap.MADV_NOHUGEPAGE)
