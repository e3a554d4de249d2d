"""The loader's store writes, off its event loop: one writer thread, commits in groups.

The loop hands a write over and goes on serving; the writer runs every write queued by
then in one transaction and posts each one's outcome back to the loop. A small write that
finds the writer idle runs at once on the loop instead: a thread switch each way would
cost more than the write (SPEC "The loader never stalls": what takes long goes here).
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
from collections.abc import Callable

from .errors import StoreError, ValueTooLarge
from .loader import Done
from .store import Store

__all__ = ["INLINE_LIMIT", "StoreWriter"]

log = logging.getLogger(__name__)

INLINE_LIMIT = 64 << 10  # bytes of payload a write may have to run on the loop itself

Job = Callable[[Store], None]
_Queued = tuple[Job, Done]


def _run(job: Job, store: Store) -> BaseException | None:
    try:
        job(store)
    except (StoreError, ValueTooLarge) as exc:
        return exc
    return None


class StoreWriter:
    """A :class:`~clustorage.loader.Writes` with a thread of its own.

    Args:
        store: where the writes go.
        post: runs a function on the loop thread (``call_soon_threadsafe``).
    """

    def __init__(self, store: Store, post: Callable[[Callable[[], None]], object]) -> None:
        self._store = store
        self._post = post
        self._queue: collections.deque[_Queued] = collections.deque()
        self._ready = threading.Condition()
        self._writing = False
        self._closing = False
        self._thread = threading.Thread(
            target=self._serve, name="clustorage-store-writer", daemon=True
        )
        self._thread.start()

    def write(self, job: Job, done: Done, size: int) -> None:
        """Run ``job(store)``; ``done(error or None)`` follows on the loop thread."""
        with self._ready:
            inline = size <= INLINE_LIMIT and not self._queue and not self._writing
            if not inline:
                self._queue.append((job, done))
                self._ready.notify()
        if inline:  # the writer is idle, and only this thread gives it work
            done(_run(job, self._store))

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closing:
                    self._ready.wait()
                if not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
                self._writing = True
            outcomes = self._write_group(batch)
            with self._ready:
                self._writing = False
            self._post(functools.partial(self._report, batch, outcomes))

    def _write_group(self, batch: list[_Queued]) -> list[BaseException | None]:
        """Every write of ``batch`` in one transaction; if that fails, each on its own,
        so that one failing write fails only its own request."""
        if len(batch) > 1:
            try:
                with self._store.transaction():
                    for job, _ in batch:
                        job(self._store)
                return [None] * len(batch)
            except (StoreError, ValueTooLarge) as exc:
                log.info(
                    "a group of %d writes failed (%s); writing them one by one", len(batch), exc
                )
        return [_run(job, self._store) for job, _ in batch]

    @staticmethod
    def _report(batch: list[_Queued], outcomes: list[BaseException | None]) -> None:
        for (_, done), outcome in zip(batch, outcomes, strict=True):
            try:
                done(outcome)
            except Exception:
                log.exception("failed to finish a store write")

    def close(self, timeout: float = 30.0) -> None:
        """Finish the queued writes (their outcomes are no longer reported), then stop."""
        with self._ready:
            self._closing = True
            self._post = lambda function: None
            self._ready.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
