"""The loader's store writes, off its event loop: commits in groups, big payloads apart.

The loop hands a write over and goes on serving (SPEC "The loader never stalls"). Two
threads take them:

* the *row* writer runs every row write queued by then in one transaction (group commit)
  and posts each one's outcome back to the loop. A small write that finds it idle runs on
  the loop instead: a thread switch each way would cost more than the write. It runs once
  the loop has read what arrived meanwhile, with every other small write of that pass, in
  one transaction: eight writers' puts cost one commit, not eight.
* the *file* writer first puts a big payload in a file of its own (clustorage.blobs), so
  that writing 900 MB holds up no other write; its row then joins the row writer's queue.

The loader never has two writes of one entry in flight, so the lanes reorder nothing that
matters. The loop and the row writer share the store's one connection, whose transaction
belongs to whichever thread began it: a lock keeps them apart, and the loop, which never
waits for it, hands its writes to the row writer when it is taken.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import StoreError, ValueTooLarge
from .messages import Entry
from .store import Store
from .writes import Done, Stored

__all__ = ["INLINE_LIMIT", "StoreWriter"]

log = logging.getLogger(__name__)

INLINE_LIMIT = 64 << 10  # bytes of payload a write may have to run on the loop itself

Job = Callable[[Store], None]
_Queued = tuple[Job, Done]
Post = Callable[[Callable[[], None]], object]
T = TypeVar("T")


def _call_each(calls: list[Callable[[], None]]) -> None:
    for call in calls:
        try:
            call()
        except Exception:
            log.exception("a store write failed")


def _run(job: Job, store: Store) -> BaseException | None:
    try:
        job(store)
    except (StoreError, ValueTooLarge) as exc:
        return exc
    except Exception as exc:  # answered all the same: its request must not wait forever
        log.exception("a store write failed unexpectedly")
        return StoreError(f"the loader could not write to its store: {exc!r}")
    return None


class _Lane(Generic[T]):
    """One thread that takes what is queued in batches."""

    def __init__(self, name: str, serve: Callable[[list[T]], None]) -> None:
        self._serve = serve
        self._queue: collections.deque[T] = collections.deque()
        self._ready = threading.Condition()
        self.working = False
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def idle(self) -> bool:
        """Whether it has nothing to do, read without the lock: the lane marks itself busy
        before it empties its queue, so a batch it has just taken never looks idle."""
        return not self._queue and not self.working

    def put(self, item: T) -> None:
        with self._ready:
            self._queue.append(item)
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closing:
                    self._ready.wait()
                if not self._queue:
                    return
                self.working = True  # first: see idle()
                batch = list(self._queue)
                self._queue.clear()
            try:
                self._serve(batch)
            except Exception:
                log.exception("%s failed", self._thread.name)
            finally:
                with self._ready:
                    self.working = False

    def close(self, timeout: float) -> None:
        with self._ready:
            self._closing = True
            self._ready.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


class StoreWriter:
    """A :class:`~clustorage.loader.Writes` with threads of its own.

    Args:
        store: where the writes go.
        post: runs a function on the loop thread (``call_soon_threadsafe``).
        inline: whether a small write may run on the loop (not for a store across the
            network, whose commit waits for a round trip and a flush).
        soon: runs a function on the loop once it has served what is ready, from the loop
            thread (``call_soon``); the small writes of one pass then commit together.
            Without it, each runs at once.
    """

    def __init__(
        self, store: Store, post: Post, inline: bool = True, soon: Post | None = None
    ) -> None:
        self._store = store
        self._inline = inline
        # From this many bytes of payload a write leaves the loop (all, for a remote store).
        self.off_loop_from = INLINE_LIMIT + 1 if inline else 0
        self._post = post
        self._soon = soon
        self._gathered: list[_Queued] = []  # small writes of this pass, for the loop
        self._using_store = threading.Lock()  # see the module docstring
        self._rows: _Lane[_Queued] = _Lane("clustorage-store-writer", self._write_rows)
        self._files: _Lane[Callable[[], None]] = _Lane("clustorage-file-writer", _call_each)

    def commit(self, entry: Entry, previous: int, done: Stored) -> None:
        """Make ``entry`` durable; ``done(payload as stored, error)`` follows on the loop."""
        if self._store.stages(entry):
            self._files.put(functools.partial(self._write_file, entry, previous, done))
            return

        def row_done(error: BaseException | None) -> None:
            done(None if error else entry.payload, error)

        self._row(lambda store: store.commit(entry, previous), row_done, len(entry.payload))

    def delete(self, kind: str, key: str, version: int, origin: str, done: Done) -> None:
        """Record the tombstone; ``done(error or None)`` follows on the loop thread."""
        self._row(lambda store: store.delete(kind, key, version, origin), done, 0)

    def _row(self, job: Job, done: Done, size: int) -> None:
        if not (self._inline and size <= INLINE_LIMIT and self._rows.idle()):
            self._rows.put((job, done))
            return
        self._gathered.append((job, done))
        if self._soon is None:
            self._write_gathered()
        elif len(self._gathered) == 1:
            self._soon(self._write_gathered)

    def _write_gathered(self) -> None:
        """On the loop (at once, without ``soon``): the small writes of the pass, together
        (on the row writer, if a big value's row went there meanwhile or it is writing)."""
        batch, self._gathered = self._gathered, []
        if not self._rows.idle() or not self._using_store.acquire(blocking=False):
            for queued in batch:
                self._rows.put(queued)
            return
        try:
            outcomes = self._write_group(batch)
        finally:
            self._using_store.release()
        self._report(batch, outcomes)

    def _write_file(self, entry: Entry, previous: int, done: Stored) -> None:
        """On the file lane: put ``entry``'s payload in its file, then queue its row."""
        try:
            file = self._store.write_blob(entry.payload)
        except (StoreError, OSError) as exc:
            self._post(functools.partial(done, None, exc))
            return

        def row_done(error: BaseException | None) -> None:
            if error is not None:
                self._store.remove_blob(file)
                done(None, error)
                return
            try:
                stored = self._store.read_blob(file)
            except StoreError:  # committed all the same: serve it from memory
                stored = entry.payload
            done(stored, None)

        self._rows.put((lambda store: store.commit(entry, previous, file), row_done))

    def _write_rows(self, batch: list[_Queued]) -> None:
        with self._using_store:
            outcomes = self._write_group(batch)
        self._post(functools.partial(self._report, batch, outcomes))

    def _write_group(self, batch: list[_Queued]) -> list[BaseException | None]:
        """Every write of ``batch`` in one transaction; if that fails, each on its own,
        so that one failing write fails only its own request, and a deletion that finds the
        disk full may use the room the store keeps for deletions, which a put may not."""
        if len(batch) > 1:
            try:
                with self._store.transaction():
                    for job, _ in batch:
                        job(self._store)
                return [None] * len(batch)
            except Exception as exc:
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
        self._post = lambda function: None
        gathered, self._gathered = self._gathered, []
        for queued in gathered:  # the loop has stopped: the row writer writes them
            self._rows.put(queued)
        self._files.close(timeout)
        self._rows.close(timeout)
