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
from collections.abc import Callable

from .poll_windows import POLL_FOR, PollWindows

__all__ = ["StayAwake"]


class StayAwake:
    """Keeps ``loop`` polling through the windows that requests open. Used on the loop's
    thread only; ``clock`` and ``yield_`` are for tests."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        poll_for: float = POLL_FOR,
        clock: Callable[[], float] = time.perf_counter,
        yield_: Callable[[], None] = os.sched_yield,
    ) -> None:
        self._loop = loop
        self._windows = PollWindows(poll_for)
        self._clock = clock
        self._yield = yield_

    @property
    def polling(self) -> bool:
        """Whether a window is open."""
        return self._windows.open

    def requested(self) -> None:
        """A request was read."""
        if self._windows.arrived(self._clock()):
            self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        """A turn: the loop polls its sockets (without blocking, since this is scheduled
        again) once this yield is done."""
        windows = self._windows
        began = self._clock()
        if not windows.turn(began):
            return
        self._yield()
        windows.waited(self._clock() - began)
        if windows.open:
            self._loop.call_soon(self._poll)
