"""The loader's durable store: every value and function version in SQLite.

The only module that imports sqlite3. WAL journal, one writer (the loader's event loop).
A version is committed before the loader acknowledges or hot-loads it (SPEC "Durability").
Deletions are tombstone rows, so a key's history stays auditable. ``--data :memory:`` keeps
nothing, so its store is plain dictionaries with the same rules.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from .errors import StoreError
from .messages import VALUE, Entry

__all__ = ["MEMORY", "MemoryStore", "SQLiteStore", "Store", "open_store"]

log = logging.getLogger(__name__)
MEMORY = ":memory:"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    kind     TEXT    NOT NULL,
    key      TEXT    NOT NULL,
    version  INTEGER NOT NULL,
    payload  BLOB,
    source   TEXT,
    origin   TEXT    NOT NULL,
    time     REAL    NOT NULL,
    deleted  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, key, version)
);
CREATE TABLE IF NOT EXISTS identity (id TEXT NOT NULL);
"""

_CURRENT = """
SELECT kind, key, version, payload, source, origin, time FROM entries AS e
WHERE deleted = 0 AND version = (
    SELECT MAX(version) FROM entries WHERE kind = e.kind AND key = e.key)
"""


class Store(Protocol):
    """What the loader needs from a store."""

    path: str
    identity: str  # made once when the store is created: versions are numbered per store

    def current(self) -> list[Entry]: ...

    def last_versions(self) -> dict[tuple[str, str], int]: ...

    def commit(self, entry: Entry, previous: int = 0) -> None: ...

    def delete(self, kind: str, key: str, version: int, origin: str) -> None: ...

    def history(self, kind: str, key: str) -> list[Entry]: ...

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """Every write inside commits together, or none does (StoreError)."""
        ...

    def close(self) -> None: ...


class SQLiteStore:
    """A :class:`Store` in one SQLite file (or in memory for ``:memory:``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            if path != MEMORY:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            # Large pages keep big payloads in few overflow pages (takes effect on a new file).
            self._db.execute("PRAGMA page_size=65536")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self.identity = self._identity()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                f"cannot open the loader's data file {path}: {exc}; choose a writable "
                f"directory with --data DIR (or --data :memory: to keep nothing)"
            ) from exc

    def _identity(self) -> str:
        row = self._db.execute("SELECT id FROM identity").fetchone()
        if row is not None:
            return str(row[0])
        identity = secrets.token_hex(16)
        self._db.execute("INSERT INTO identity (id) VALUES (?)", (identity,))
        return identity

    def current(self) -> list[Entry]:
        """The latest, undeleted version of every key."""
        return [Entry(*row) for row in self._db.execute(_CURRENT)]

    def last_versions(self) -> dict[tuple[str, str], int]:
        """The highest version ever used for each key, deleted ones included."""
        rows = self._db.execute("SELECT kind, key, MAX(version) FROM entries GROUP BY kind, key")
        return {(kind, key): version for kind, key, version in rows}

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Every write inside commits together, or none does.

        Raises:
            StoreError: a write or the commit failed; everything inside was rolled back.
        """
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"the loader could not write {self.path}: {exc}") from exc
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"the loader could not write {self.path}: {exc}") from exc
            raise

    def _write(self, statements: list[tuple[str, tuple[object, ...]]]) -> None:
        if self._db.in_transaction:  # inside transaction(): it commits, or rolls back
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
            except sqlite3.Error as exc:
                raise StoreError(f"the loader could not write {self.path}: {exc}") from exc
            return
        try:
            if len(statements) == 1:  # one statement is its own transaction
                self._db.execute(*statements[0])
                return
            self._db.execute("BEGIN IMMEDIATE")
            for sql, args in statements:
                self._db.execute(sql, args)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise StoreError(f"the loader could not write {self.path}: {exc}") from exc

    def commit(self, entry: Entry, previous: int = 0) -> None:
        """Make ``entry`` durable. A value's ``previous`` payload is dropped; its history stays.

        Raises:
            StoreError: the write failed (disk full, file gone); nothing was stored.
        """
        statements: list[tuple[str, tuple[object, ...]]] = [
            (
                "INSERT INTO entries (kind, key, version, payload, source, origin, time) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                tuple(entry),
            )
        ]
        if entry.kind == VALUE and previous:
            statements.append(
                (
                    "UPDATE entries SET payload = NULL WHERE kind = ? AND key = ? AND version = ?",
                    (entry.kind, entry.key, previous),
                )
            )
        self._write(statements)

    def delete(self, kind: str, key: str, version: int, origin: str) -> None:
        """Record that ``key`` was deleted, as tombstone ``version``."""
        self._write(
            [
                (
                    "INSERT INTO entries (kind, key, version, payload, source, origin, time, "
                    "deleted) VALUES (?, ?, ?, NULL, NULL, ?, ?, 1)",
                    (kind, key, version, origin, time.time()),
                ),
                (
                    "UPDATE entries SET payload = NULL WHERE kind = ? AND key = ? AND kind = ?",
                    (kind, key, VALUE),
                ),
            ]
        )

    def history(self, kind: str, key: str) -> list[Entry]:
        """Every version of ``key``, oldest first; deletions have version payload ``b''``."""
        rows = self._db.execute(
            "SELECT kind, key, version, COALESCE(payload, X''), source, origin, time "
            "FROM entries WHERE kind = ? AND key = ? ORDER BY version",
            (kind, key),
        )
        return [Entry(*row) for row in rows]

    def close(self) -> None:
        self._db.close()


class MemoryStore:
    """A :class:`Store` that keeps nothing past the process: every version in dictionaries."""

    path = MEMORY

    def __init__(self) -> None:
        self.identity = secrets.token_hex(16)
        self._versions: dict[tuple[str, str], list[Entry]] = {}
        self._deleted: set[tuple[str, str, int]] = set()

    def current(self) -> list[Entry]:
        return [
            versions[-1]
            for (kind, key), versions in self._versions.items()
            if (kind, key, versions[-1].version) not in self._deleted
        ]

    def last_versions(self) -> dict[tuple[str, str], int]:
        return {where: versions[-1].version for where, versions in self._versions.items()}

    def commit(self, entry: Entry, previous: int = 0) -> None:
        versions = self._versions.setdefault((entry.kind, entry.key), [])
        if entry.kind == VALUE and versions and versions[-1].version == previous:
            versions[-1] = versions[-1].without_payload()
        versions.append(entry)

    def delete(self, kind: str, key: str, version: int, origin: str) -> None:
        versions = self._versions.setdefault((kind, key), [])
        if kind == VALUE:
            versions[:] = [entry.without_payload() for entry in versions]
        versions.append(Entry(kind, key, version, b"", None, origin, time.time()))
        self._deleted.add((kind, key, version))

    def history(self, kind: str, key: str) -> list[Entry]:
        return list(self._versions.get((kind, key), ()))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        yield

    def close(self) -> None:
        self._versions.clear()


def open_store(path: str) -> Store:
    """Open (creating if needed) the store at ``path``; ``:memory:`` keeps nothing."""
    if path == MEMORY:
        return MemoryStore()
    store = SQLiteStore(path)
    log.info("store %s: %d entries", path, len(store.current()))
    return store
