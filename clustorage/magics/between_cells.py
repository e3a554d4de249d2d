"""The library's warnings in a kernel, shown in the cell that runs, never under an old one.

A line a kernel writes to stderr while no cell runs goes out under the last cell that ran
(its output stream follows the last request). ``clustorage`` logs what a user should see
(a lost loader, a reconnection) as warnings, from its own threads, at any time: this handler
writes them at once while a cell runs, and otherwise keeps them for the start of the next.
"""

from __future__ import annotations

import collections
import logging
import sys

__all__ = ["BetweenCells"]

_KEPT = 20  # warnings kept while idle; older ones are dropped, their count said


class BetweenCells(logging.Handler):
    """Added to the ``clustorage`` logger in a kernel; the session calls :meth:`cell_starts`
    before each cell and :meth:`cell_ends` after it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(message)s"))
        self._running = False
        self._kept: collections.deque[str] = collections.deque(maxlen=_KEPT)
        self._dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # logging's own rule: a bad record never breaks the caller
            self.handleError(record)
            return
        with self.lock:  # type: ignore[union-attr]
            if not self._running:
                self._dropped += len(self._kept) == self._kept.maxlen
                self._kept.append(line)
                return
        print(line, file=sys.stderr, flush=True)

    def cell_starts(self) -> None:
        """Show what was kept while no cell ran; from now on, warnings go out at once."""
        with self.lock:  # type: ignore[union-attr]
            kept, dropped = list(self._kept), self._dropped
            self._kept.clear()
            self._dropped = 0
            self._running = True
        if dropped:
            print(f"({dropped} earlier clustorage warnings not shown)", file=sys.stderr)
        for line in kept:
            print(line, file=sys.stderr, flush=True)

    def cell_ends(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._running = False
