"""Fresh anonymous memory for big buffers, mapped in whichever page size costs less here.

Huge pages (Linux THP) map 2 MiB per fault, usually for a tenth of what 4 KiB pages cost.
Under a hypervisor that takes back the guest's free memory (free page reporting, which
reports free 2 MiB blocks), the first touch of a huge page that was long free waits for
the host to back it again, and costs several times the 4 KiB pages of the same size, which
come from smaller free blocks the host did not take. Measured on such a virtual machine:
one huge page took about 90 us to fault in when its memory had been freed a moment before,
and about 6.8 ms when long free; 2 MiB of 4 KiB pages took 0.8-1.1 ms either way.

Which kind is cheap changes with what was freed lately, so each big buffer finds out for
itself: it is mapped (:class:`FreshMemory`) or filled (``bigbytes``) a huge page at a time,
each timed (:class:`HugePageCost`). Two huge pages in a row slower than
:data:`COLD_HUGE_PAGE` (one alone may have been a busy CPU) turn the rest of that buffer to
4 KiB pages.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import time
from collections.abc import Callable

__all__ = [
    "COLD_HUGE_PAGE",
    "HUGE_BY_DEFAULT",
    "HUGE_PAGE",
    "HUGE_PAGES",
    "FreshMemory",
    "HugePageCost",
    "PagesAhead",
    "thp_setting",
    "to_huge_page_end",
]

HUGE_PAGE = 1 << 21
COLD_HUGE_PAGE = 0.002  # seconds: about twice what 2 MiB of 4 KiB pages take to fault in
_PAGE = mmap.PAGESIZE
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; 3.11 lacks the name
_NO_HUGE_PAGES: int | None = getattr(mmap, "MADV_NOHUGEPAGE", None)


def thp_setting(text: str) -> str:
    """Linux THP's setting for anonymous memory (always, madvise or never), from the text
    of /sys/kernel/mm/transparent_hugepage/enabled (``always [madvise] never``)."""
    return text.partition("[")[2].partition("]")[0] or "never"


def _huge_pages_setting() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
            return thp_setting(setting.read())
    except OSError:
        return "never"


_SETTING = _huge_pages_setting()
HUGE_PAGES = hasattr(mmap, "MADV_HUGEPAGE") and _SETTING != "never"  # when asked for
HUGE_BY_DEFAULT = HUGE_PAGES and _SETTING == "always"  # without asking


class _Kernel:
    populate_write = True  # until the kernel says it has no MADV_POPULATE_WRITE


_kernel = _Kernel()


class HugePageCost:
    """Whether huge pages stay cheap over one buffer, told how long each whole huge page
    took to map (or to map and fill)."""

    def __init__(self) -> None:
        self.cheap = HUGE_PAGES
        self._slow = 0  # huge pages in a row that were slow

    def took(self, seconds: float) -> bool:
        """One more whole huge page took ``seconds``; whether huge pages are still cheap
        (once not, never again for this buffer)."""
        self._slow = self._slow + 1 if seconds > COLD_HUGE_PAGE else 0
        if self._slow >= 2:
            self.cheap = False
        return self.cheap


def to_huge_page_end(address: int) -> int:
    """Bytes from ``address`` to the end of the huge page it is in (a whole one from its
    start): the step of a buffer mapped or filled a huge page at a time."""
    return HUGE_PAGE - address % HUGE_PAGE


def _address(data: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(data)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # lets the map be closed again


class PagesAhead:
    """``length`` bytes of private anonymous memory from address ``start``, their pages
    mapped in as asked for (:meth:`map_until`), in huge pages while they stay cheap, else in
    4 KiB pages. The memory itself is the subclass's (:class:`FreshMemory`, or a big bytes
    value's, see ``bigbytes``)."""

    def __init__(self, start: int, length: int, clock: Callable[[], float]) -> None:
        self.length = length
        self.mapped = 0  # [start, start + mapped) has its pages
        self.cost = HugePageCost()
        self._start = start
        self._clock = clock  # the thread's CPU time: not another thread's turn, if preempted
        if self.cost.cheap:
            self._advise(mmap.MADV_HUGEPAGE, 0)

    def map_until(self, end: int) -> None:
        """Map the pages of the first ``end`` bytes that are not mapped yet (never changing
        a byte)."""
        end = min(end, self.length)
        while self.mapped < end:
            start = self.mapped
            if not self.cost.cheap:
                self._populate(start, end)
                self.mapped = end
                return
            stop = min(start + to_huge_page_end(self._start + start), self.length)
            began = self._clock()
            self._populate(start, stop)
            took = self._clock() - began
            self.mapped = stop
            if stop - start == HUGE_PAGE and not self.cost.took(took):
                self._advise(_NO_HUGE_PAGES, stop)

    def _madvise(self, advice: int, address: int, length: int) -> None:
        """``madvise`` on whole pages (``address`` is a page's); OSError if refused."""
        raise NotImplementedError

    def _touch(self, address: int) -> None:
        """Read and write back the byte at ``address``."""
        raise NotImplementedError

    def _populate(self, start: int, end: int) -> None:
        first = (self._start + start) // _PAGE * _PAGE
        last = self._start + end
        if _kernel.populate_write:
            try:
                self._madvise(_POPULATE_WRITE, first, last - first)
                return
            except OSError as exc:  # no memory: the pages come as bytes do, or not at all
                if exc.errno != errno.EINVAL:
                    return
                _kernel.populate_write = False  # an older kernel: touch each page instead
        for address in range(max(first, self._start), last, _PAGE):
            self._touch(address)

    def _advise(self, advice: int | None, start: int) -> None:
        if advice is None or not HUGE_PAGES or start >= self.length:
            return
        first = -(-(self._start + start) // _PAGE) * _PAGE  # a page partly before stays
        last = self._start + self.length
        if last > first:
            with contextlib.suppress(OSError):  # only ever faster: never a reason to refuse
                self._madvise(advice, first, last - first)


class FreshMemory(PagesAhead):
    """A new anonymous map of ``length`` bytes (``data``, a ``buffer_type``: mmap.mmap or
    a subclass), its pages mapped in as asked for."""

    def __init__(
        self,
        length: int,
        clock: Callable[[], float] = time.thread_time,
        buffer_type: type[mmap.mmap] = mmap.mmap,
    ) -> None:
        self.data = buffer_type(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        super().__init__(_address(self.data), length, clock)

    def _madvise(self, advice: int, address: int, length: int) -> None:
        self.data.madvise(advice, address - self._start, length)

    def _touch(self, address: int) -> None:
        offset = address - self._start
        self.data[offset] = self.data[offset]
