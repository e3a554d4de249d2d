"""A clock and a yield for the polling windows of the loader's loop and a member's reader
(clustorage.poll_windows), moved and counted by the test."""

from __future__ import annotations

import threading


class Clock:
    """The time a polling thread reads, moved only by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Yields:
    """The polling thread's yields, counted; each moves ``clock`` on by ``takes`` seconds
    (a yield that waited for the GIL or a CPU takes long)."""

    def __init__(self, clock: Clock, takes: float = 0.0) -> None:
        self.clock = clock
        self.takes = takes
        self.count = 0
        self.several = threading.Event()  # three or more

    def __call__(self) -> None:
        self.count += 1
        self.clock.now += self.takes
        if self.count >= 3:
            self.several.set()
