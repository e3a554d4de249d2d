"""The loader's loop stays awake for a moment after a request, polling instead of sleeping.

A member's next message usually follows the loader's answer within tens of microseconds:
the commit after a lease, the next request of a loop. Sleeping in ``epoll_wait`` and being
woken again costs more CPU than that wait (on a virtual machine, about 30 µs a time), and
delays the message by as much. So for ``POLL_FOR`` after a request the loop keeps a
callback ready, which makes each of its turns poll its sockets without blocking; each turn
yields the CPU first, so that a process sharing it (the member, most likely) runs before.
An idle loader, or one that hears only heartbeats and acknowledgements, never polls.
"""

from __future__ import annotations

import asyncio
import os
import time

__all__ = ["POLL_FOR", "StayAwake"]

POLL_FOR = 100e-6  # seconds; as long as a member polls for its answer (member.SPIN)


class StayAwake:
    """Keeps ``loop`` polling for ``poll_for`` seconds after the latest :meth:`requested`.

    Used on the loop's thread only.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, poll_for: float = POLL_FOR) -> None:
        self._loop = loop
        self._poll_for = poll_for
        self._until = 0.0
        self.polling = False

    def requested(self) -> None:
        """A request was read: poll until ``poll_for`` from now."""
        self._until = time.perf_counter() + self._poll_for
        if not self.polling and self._poll_for > 0:
            self.polling = True
            self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        if time.perf_counter() >= self._until:
            self.polling = False
            return
        os.sched_yield()
        self._loop.call_soon(self._poll)
