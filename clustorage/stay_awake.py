"""The loader's loop stays awake for a moment after a request, polling instead of sleeping.

For a window after a request (clustorage.poll_windows says how long, and whether polling
pays) the loop keeps a callback ready, which makes each of its turns poll its sockets
without blocking; each turn yields the CPU first, so that a process sharing it (the member,
most likely) runs before. An idle loader, or one that hears only heartbeats and
acknowledgements, never polls.
"""

from __future__ import annotations

import asyncio
import os
import time

from .poll_windows import POLL_FOR, PollWindows

__all__ = ["StayAwake"]


class StayAwake:
    """Keeps ``loop`` polling through the windows that requests open. Used on the loop's
    thread only."""

    def __init__(self, loop: asyncio.AbstractEventLoop, poll_for: float = POLL_FOR) -> None:
        self._loop = loop
        self._windows = PollWindows(poll_for)

    @property
    def polling(self) -> bool:
        """Whether a window is open."""
        return self._windows.open

    def requested(self) -> None:
        """A request was read."""
        if self._windows.arrived(time.perf_counter()):
            self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        now = time.perf_counter()
        if not self._windows.turn(now):
            return
        self._windows.rested(now)
        os.sched_yield()
        self._loop.call_soon(self._poll)
