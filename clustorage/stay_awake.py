"""The loader's loop stays awake for a moment after a request, polling instead of sleeping.

A member's next message often follows the loader's answer within tens of microseconds: the
commit after a lease for a quick ``fn``, the next request of a loop. Sleeping in
``epoll_wait`` and being woken again costs more CPU than that wait (on a virtual machine,
about 30 µs a time), and delays the message by as much. So for ``POLL_FOR`` after a request
the loop keeps a callback ready, which makes each of its turns poll its sockets without
blocking; each turn yields the CPU first, so that a process sharing it (the member, most
likely) runs before. An idle loader, or one that hears only heartbeats and
acknowledgements, never polls.

Polling pays only while requests come that soon, one after another. A window that catches
several requests earns credit; one that catches one or none, or whose turns come late (the
thread waited for the GIL, held by other Python work in the process, or for a CPU), costs
some. Without credit the loop sleeps at once, and tries a window again every
``RETRY_AFTER`` requests. So a loader whose members run slow ``fn``, or that shares its
process or its CPUs with busy work, soon stops polling.
"""

from __future__ import annotations

import asyncio
import os
import time

__all__ = ["POLL_FOR", "StayAwake"]

POLL_FOR = 100e-6  # seconds; as long as a member polls for its answer (member.SPIN)
CREDIT = 4  # at most; a window that catches several requests earns 1, one costs 1, none 2
RETRY_AFTER = 16  # requests without a window, once the credit is spent
LATE = 1e-3  # seconds between two turns of a window that mean the loop could not poll


class StayAwake:
    """Keeps ``loop`` polling for ``poll_for`` seconds after the latest :meth:`requested`,
    while polling has paid lately. Used on the loop's thread only."""

    def __init__(self, loop: asyncio.AbstractEventLoop, poll_for: float = POLL_FOR) -> None:
        self._loop = loop
        self._poll_for = poll_for
        self._until = 0.0
        self._polling = False
        self._caught = 0  # requests the current window caught
        self._turned = 0.0  # when the window's latest turn began
        self._credit = CREDIT
        self._without = 0  # requests since the credit was spent

    @property
    def polling(self) -> bool:
        """Whether a window is open."""
        return self._polling

    def requested(self) -> None:
        """A request was read: poll until ``poll_for`` from now, if polling pays."""
        if self._poll_for <= 0:
            return
        if self._polling:
            self._caught += 1
        elif self._credit <= 0:
            self._without += 1
            if self._without < RETRY_AFTER:
                return
            self._without, self._credit = 0, 1
        now = time.perf_counter()
        self._until = now + self._poll_for
        if not self._polling:
            self._polling, self._caught, self._turned = True, 0, now
            self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        now = time.perf_counter()
        late = now - self._turned > LATE
        if late or now >= self._until:
            self._polling = False
            self._credit = min(self._credit + self._earned(late), CREDIT)
            return
        self._turned = now
        os.sched_yield()
        self._loop.call_soon(self._poll)

    def _earned(self, late: bool) -> int:
        """What the window that ends earned: its turns came late, or it caught no request,
        one, or several."""
        if late or not self._caught:
            return -2
        return 1 if self._caught > 1 else -1
