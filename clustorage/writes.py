"""Where the loader's store writes and slow work run: the interfaces LoaderCore asks for,
and the versions that run them at once, on the caller's thread (for a store that keeps
nothing, and for tests). The loader's own threads for them are in clustorage.writer and
clustorage.runtime."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol

from .errors import StoreError, ValueTooLarge
from .messages import Blob, Entry
from .store import Store

__all__ = ["Aside", "Done", "Stored", "WriteHere", "Writes", "commit_entry", "work_here"]

Done = Callable[[BaseException | None], None]
Stored = Callable[[Blob | None, BaseException | None], None]  # the payload as stored, or why not


class Writes(Protocol):
    """Where store writes run; ``done(error or None)`` follows on the loop thread."""

    off_loop_from: int  # bytes of payload from which a write may run off the loop (and long)

    def commit(self, entry: Entry, previous: int, done: Stored) -> None: ...

    def delete(self, kind: str, key: str, version: int, origin: str, done: Done) -> None: ...


class Aside(Protocol):
    """Where slow work runs (compiling): ``work()``, then ``done(result, error)`` on the loop."""

    def __call__(
        self, work: Callable[[], Any], done: Callable[[Any, BaseException | None], None]
    ) -> None: ...


def commit_entry(store: Store, entry: Entry, previous: int) -> Blob:
    """Make ``entry`` durable in ``store``, its payload in a file first if the store says so;
    the payload as the store keeps it (a big one mapped from its file, not in memory)."""
    file = store.write_blob(entry.payload) if store.stages(entry) else None
    try:
        store.commit(entry, previous, file)
    except BaseException:
        if file is not None:
            store.remove_blob(file)
        raise
    return entry.payload if file is None else store.read_blob(file)


class WriteHere:
    """Writes on the caller's thread, at once (for a store that keeps nothing)."""

    off_loop_from = sys.maxsize  # none leaves the caller's thread

    def __init__(self, store: Store) -> None:
        self._store = store

    def commit(self, entry: Entry, previous: int, done: Stored) -> None:
        try:
            payload = commit_entry(self._store, entry, previous)
        except (StoreError, ValueTooLarge) as exc:
            done(None, exc)
        else:
            done(payload, None)

    def delete(self, kind: str, key: str, version: int, origin: str, done: Done) -> None:
        try:
            self._store.delete(kind, key, version, origin)
        except (StoreError, ValueTooLarge) as exc:
            done(exc)
        else:
            done(None)


def work_here(work: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
    """Slow work on the caller's thread, at once."""
    try:
        result = work()
    except (Exception, SystemExit) as exc:
        done(None, exc)
    else:
        done(result, None)
