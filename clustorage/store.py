"""The loader's durable store: every value and function version in SQLite.

The only module that imports sqlite3. WAL journal; one connection, written by one thread at a
time (the loader's loop or its row writer: clustorage.writer keeps them apart).
A version is committed before the loader acknowledges or hot-loads it (SPEC "Durability").
Deletions are tombstone rows, so a key's history stays auditable. ``--data :memory:`` keeps
nothing, so its store is plain dictionaries with the same rules.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from . import codec
from .blobs import FILE_THRESHOLD, BlobFiles
from .bulk import Spill
from .config import private_directory, private_file
from .errors import StoreError, ValueTooLarge
from .lock import StoreLock
from .messages import VALUE, Blob, Entry
from .reserve import FULL, Reserve, full_disk

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
    file     TEXT,
    PRIMARY KEY (kind, key, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS identity (id TEXT NOT NULL);
"""

_CURRENT = """
SELECT kind, key, version, payload, source, origin, time, file FROM entries AS e
WHERE deleted = 0 AND version = (
    SELECT MAX(version) FROM entries WHERE kind = e.kind AND key = e.key)
"""


class Store(Protocol):
    """What the loader needs from a store."""

    path: str
    identity: str  # made once when the store is created: versions are numbered per store

    def current(self) -> list[Entry]: ...

    def last_versions(self) -> dict[tuple[str, str], int]: ...

    def commit(self, entry: Entry, previous: int = 0, file: str | None = None) -> None: ...

    def stages(self, entry: Entry) -> bool:
        """Whether ``entry``'s payload goes to a file of its own first (write_blob)."""
        ...

    def write_blob(self, payload: Blob) -> str: ...

    def arriving_blob(self, size: int) -> Spill | None:
        """Where a payload of ``size`` bytes that is arriving may be written meanwhile, so
        that :meth:`write_blob` of it, once verified, writes nothing (None: nowhere)."""
        ...

    def remove_blob(self, name: str) -> None: ...

    def read_blob(self, name: str) -> Blob: ...

    def delete(self, kind: str, key: str, version: int, origin: str) -> None: ...

    def history(self, kind: str, key: str) -> list[Entry]: ...

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """Every write inside commits together, or none does (StoreError)."""
        ...

    def announce(self, address: str) -> None: ...

    def close(self) -> None: ...


# SQLite's own files beside a store: made private before SQLite makes them (it gives them the
# store's mode), and made private again if an older version made them readable.
_SIDE_FILES = ("", "-wal", "-shm")
# Room for a row's header, version, time and flags beside its texts and payload.
_ROW_OVERHEAD = 64
# Who deleted a key whose payload's file was found missing or cut short at the start.
LOST = "(lost: its file was missing or cut short)"
_SHORT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)
Statements = list[tuple[str, tuple[object, ...]]]


def _no_room(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the user's quota) is full."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in FULL


class SQLiteStore:
    """A :class:`Store` in one SQLite file (or in memory for ``:memory:``)."""

    def __init__(self, path: str, max_length: int | None = None) -> None:
        self.path = path
        self._lock: StoreLock | None = None
        self._reserve: Reserve | None = None
        try:
            if path != MEMORY:
                # Private whatever the umask; one loader per store (SPEC "Durability").
                private_directory(Path(path).parent)
                self._reserve = Reserve(Path(f"{path}.reserve"))
            self._open_making_room(max_length)
            if self._reserve is not None and not self._reserve.make():
                log.warning(
                    "%s has less than %d bytes free: nothing is kept aside for deleting keys "
                    "should that disk fill up, and puts are refused until there is",
                    Path(path).parent,
                    self._reserve.size,
                )
        except StoreError:
            self._shut()
            raise
        except (OSError, sqlite3.Error) as exc:
            self._shut()
            raise StoreError(
                f"cannot open the loader's data file {path}: {exc}; choose a writable "
                f"directory with --data DIR (or --data :memory: to keep nothing)"
            ) from exc

    def _open_making_room(self, max_length: int | None) -> None:
        """Open the store; if its disk is too full for that, once more with the room kept
        for deletions given back, so that a loader started again on a full disk can delete."""
        try:
            self._open(max_length)
            return
        except (OSError, sqlite3.Error) as exc:
            if self._reserve is None or not _no_room(exc):
                raise
            full = exc
        self._shut()
        with self._reserve.given_back() as freed:
            if not freed:
                raise full
            self._open(max_length)

    def _open(self, max_length: int | None) -> None:
        path = self.path
        if path != MEMORY:
            self._lock = StoreLock(path)
            for suffix in _SIDE_FILES:
                private_file(Path(path + suffix))
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        if max_length is not None:  # lower than SQLite's own (tests use a small one)
            self._db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_length)
        # The most bytes a row takes: an entry over it is refused before SQLite sees it
        # (a payload that big has a file of its own, so only a huge source can be).
        self.max_length = self._db.getlimit(sqlite3.SQLITE_LIMIT_LENGTH)
        # Small pages keep a small commit small; big payloads live in files (blobs.py).
        self._db.execute("PRAGMA page_size=4096")
        # One loader per store (the lock file): SQLite need not lock the file, nor share
        # its WAL index in -shm, on every commit. Set before WAL mode, which then keeps
        # that index in memory.
        self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(entries)")}
        if "file" not in columns:  # a store made before big payloads had files
            self._db.execute("ALTER TABLE entries ADD COLUMN file TEXT")
        self.identity = self._identity()
        self._blobs = BlobFiles(Path(f"{path}.blobs"))
        self._blobs.sweep(
            {row[0] for row in self._db.execute("SELECT file FROM entries WHERE file > ''")}
        )
        self._doomed: list[str] = []  # files to delete once the transaction commits

    def _shut(self) -> None:
        """Close what an open that failed left open, so that the store may be opened again."""
        db: sqlite3.Connection | None = getattr(self, "_db", None)
        if db is not None:
            db.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _identity(self) -> str:
        row = self._db.execute("SELECT id FROM identity").fetchone()
        if row is not None:
            return str(row[0])
        identity = secrets.token_hex(16)
        self._db.execute("INSERT INTO identity (id) VALUES (?)", (identity,))
        return identity

    def _entry(self, row: tuple[Any, ...]) -> Entry:
        *fields, file = row
        if file:
            fields[3] = self._blobs.read(file)
        return Entry(*fields)

    def current(self) -> list[Entry]:
        """The latest, undeleted version of every key (big payloads mapped from files).

        A big payload whose file is missing or cut short (a power cut before the kernel
        wrote it out) leaves its key out, with a logged error: never a shorter value. Its
        key is recorded as deleted (by ``LOST``), so that nodes holding that version drop it
        when they resync, as from any deletion, and a get with a function computes it again.

        Raises:
            StoreError: a file could not be opened for want of resources (file
                descriptors, memory): nothing is left out.
        """
        entries, lost = [], []
        for row in self._db.execute(_CURRENT).fetchall():
            try:
                entries.append(self._entry(row))
            except OSError as exc:
                if exc.errno in _SHORT_OF_RESOURCES:
                    raise StoreError(
                        f"the loader could not open the file of {row[1]!r} in {self.path}: "
                        f"{exc}; raise its limits (ulimit -n) and start it again"
                    ) from exc
                log.error("left out %s %r version %s: %s", row[0], row[1], row[2], exc)
                lost.append((row[0], row[1], row[2]))
        for kind, key, version in lost:
            try:
                self.delete(kind, key, version + 1, LOST)
            except StoreError as exc:
                log.error("%r stays left out, its deletion not recorded: %s", key, exc)
        return entries

    def stages(self, entry: Entry) -> bool:
        return len(entry.payload) > FILE_THRESHOLD

    def write_blob(self, payload: Blob) -> str:
        """Write a big payload to a file of its own, durably; the name to commit it with.

        Raises:
            StoreError: the file could not be written; nothing is left behind.
        """
        self._hold_room_for_deletions(shrink=False)  # the file writer's thread
        try:
            return self._blobs.write(payload)
        except OSError as exc:
            if _no_room(exc):
                raise full_disk(Path(self.path).parent, exc) from exc
            raise StoreError(f"the loader could not write {self._blobs.folder}: {exc}") from exc

    def arriving_blob(self, size: int) -> Spill | None:
        if self._reserve is not None and not self._reserve.held:
            return None  # written once stored, after the room for deletions is set aside
        return self._blobs.arriving(size)

    def remove_blob(self, name: str) -> None:
        self._blobs.remove(name)

    def read_blob(self, name: str) -> Blob:
        """The payload in file ``name``, mapped from the file."""
        try:
            return self._blobs.read(name)
        except OSError as exc:
            raise StoreError(f"the loader could not read {self._blobs.folder}: {exc}") from exc

    def _files_of(self, where: str, args: tuple[object, ...]) -> list[str]:
        rows = self._db.execute(f"SELECT file FROM entries WHERE file > '' AND {where}", args)
        return [row[0] for row in rows]

    def _committed(self) -> None:
        doomed, self._doomed = self._doomed, []
        for name in doomed:
            self._blobs.remove(name)
        if self._reserve is not None and not self._reserve.held:  # a deletion spent it
            self._room_held(self._reserve)

    def _hold_room_for_deletions(self, shrink: bool = True) -> None:
        """Before a put takes room: raise StoreError unless the room kept for deletions is
        held (see :meth:`_room_held`)."""
        if self._reserve is not None and not self._room_held(self._reserve, shrink):
            raise self._reserve.refusal()

    def _room_held(self, reserve: Reserve, shrink: bool = True) -> bool:
        """Whether ``reserve`` holds the room for deletions: set aside again first if the
        disk has room for it now, or once the write-ahead log has given its room back
        (``shrink``: on the connection's thread)."""
        if reserve.hold():
            return True
        if not shrink or reserve.error is not None:  # not for want of room: the log's won't do
            return False
        return self._shrink_wal(reserve.size) and reserve.make()

    def _shrink_wal(self, enough: int = 0) -> bool:
        """Give the disk back the write-ahead log's room, which SQLite keeps for this store
        to reuse once the log is copied into it: on a full disk it may be what the room for
        deletions needs. Whether it did: not inside a transaction, nor when copying the log
        in would take room (pages the store's file holds no room for yet), nor when the
        disk's free room and the log's come to less than ``enough`` bytes."""
        wal = Path(self.path + "-wal")
        try:
            held = wal.stat().st_blocks * 512
            if self._db.in_transaction or not held:
                return False
            (pages,) = self._db.execute("PRAGMA page_count").fetchone()
            (size,) = self._db.execute("PRAGMA page_size").fetchone()  # older stores: 64 KiB
            if pages * size > Path(self.path).stat().st_blocks * 512:
                return False
            disk = os.statvfs(wal.parent)
            if disk.f_bavail * disk.f_frsize + held < enough:
                return False
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            return wal.stat().st_size == 0
        except (OSError, sqlite3.Error) as exc:
            log.debug("could not shrink %s: %s", wal, exc)
            return False

    def _error(self, exc: sqlite3.Error, deleting: bool = False) -> StoreError:
        if _no_room(exc):
            return full_disk(Path(self.path).parent, exc, deleting)
        return StoreError(f"the loader could not write {self.path}: {exc}")

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
            raise self._error(exc) from exc
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException as exc:
            self._doomed.clear()
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc) from exc
            raise
        self._committed()

    def _write(self, statements: Statements, doomed: list[str], deleting: bool = False) -> None:
        """Run ``statements`` together; once they commit, remove the files ``doomed``.

        A write that finds the disk full is tried again (:meth:`_commit_on_a_full_disk`);
        a put never takes the room kept aside for deletions (clustorage.reserve).
        """
        if self._db.in_transaction:  # inside transaction(): it commits, or rolls back
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
            self._doomed.extend(doomed)
            return
        try:
            self._commit_alone(statements)
        except sqlite3.Error as exc:
            if not _no_room(exc):
                raise self._error(exc) from exc
            self._commit_on_a_full_disk(statements, exc, deleting)
        self._doomed.extend(doomed)
        self._committed()

    def _commit_on_a_full_disk(
        self, statements: Statements, full: sqlite3.Error, deleting: bool
    ) -> None:
        """Commit ``statements``, which found the disk ``full``, once more with the room
        the write-ahead log kept given back to the disk; a deletion that fails still, with
        the room kept aside for deletions too."""
        if self._shrink_wal():
            try:
                self._commit_alone(statements)
                return
            except sqlite3.Error as exc:
                if not _no_room(exc):
                    raise self._error(exc) from exc
                full = exc
        if not deleting:
            raise self._error(full) from full
        self._commit_with_room_kept_aside(statements, full)

    def _commit_with_room_kept_aside(self, statements: Statements, full: sqlite3.Error) -> None:
        """Commit a deletion that found the disk ``full`` once more, with the room kept
        aside for deletions given back to the disk (and not set aside again meanwhile)."""
        if self._reserve is None:
            raise self._error(full, deleting=True) from full
        with self._reserve.given_back() as freed:
            if not freed:
                raise self._error(full, deleting=True) from full
            try:
                self._commit_alone(statements)
            except sqlite3.Error as exc:
                raise self._error(exc, deleting=True) from exc

    def _commit_alone(self, statements: Statements) -> None:
        try:
            if len(statements) == 1:  # one statement is its own transaction
                self._db.execute(*statements[0])
            else:
                self._db.execute("BEGIN IMMEDIATE")
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
        except sqlite3.Error:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def commit(self, entry: Entry, previous: int = 0, file: str | None = None) -> None:
        """Make ``entry`` durable (its payload already in ``file``, from write_blob, if
        given). A value's ``previous`` payload is dropped; its history stays.

        Raises:
            ValueTooLarge: the entry is over what a row holds; nothing was stored.
            StoreError: the write failed (disk full, file gone), or the room kept for
                deletions cannot be set aside (clustorage.reserve); nothing was stored.
        """
        self._hold_room_for_deletions()
        fields = (*entry[:3], None if file else entry.payload, *entry[4:], file)
        texts = (entry.kind, entry.key, entry.source or "", entry.origin)
        size = 0 if file else len(entry.payload)
        if size + 4 * sum(map(len, texts)) + _ROW_OVERHEAD > self.max_length:  # it may not fit
            size += sum(len(text.encode(errors="surrogatepass")) for text in texts)
        if size + _ROW_OVERHEAD > self.max_length:
            raise ValueTooLarge(
                f"{entry.key!r} takes {size} bytes, over the {self.max_length} bytes one entry "
                f"can take in the loader's store {self.path}; {codec.SPLIT_IT}"
            )
        statements: Statements = [
            (
                "INSERT INTO entries (kind, key, version, payload, source, origin, time, file) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                fields,
            )
        ]
        doomed: list[str] = []
        if entry.kind == VALUE and previous:
            where = (entry.kind, entry.key, previous)
            doomed = self._files_of("kind = ? AND key = ? AND version = ?", where)
            statements.append(
                (
                    "UPDATE entries SET payload = NULL, file = NULL "
                    "WHERE kind = ? AND key = ? AND version = ?",
                    where,
                )
            )
        self._write(statements, doomed)

    def delete(self, kind: str, key: str, version: int, origin: str) -> None:
        """Record that ``key`` was deleted, as tombstone ``version``, and remove its files.

        Raises:
            StoreError: the write failed (a full disk even with the room kept for
                deletions given back); nothing was deleted.
        """
        doomed = self._files_of("kind = ? AND key = ?", (kind, key)) if kind == VALUE else []
        self._write(
            [
                (
                    "INSERT INTO entries (kind, key, version, payload, source, origin, time, "
                    "deleted) VALUES (?, ?, ?, NULL, NULL, ?, ?, 1)",
                    (kind, key, version, origin, time.time()),
                ),
                (
                    "UPDATE entries SET payload = NULL, file = NULL "
                    "WHERE kind = ? AND key = ? AND kind = ?",
                    (kind, key, VALUE),
                ),
            ],
            doomed,
            deleting=True,
        )

    def history(self, kind: str, key: str) -> list[Entry]:
        """Every version of ``key``, oldest first; deletions have version payload ``b''``."""
        rows = self._db.execute(
            "SELECT kind, key, version, COALESCE(payload, X''), source, origin, time, file "
            "FROM entries WHERE kind = ? AND key = ? ORDER BY version",
            (kind, key),
        )
        return [self._entry(row) for row in rows]

    def announce(self, address: str) -> None:
        """Say, in the store's lock file, that this loader listens on ``address``."""
        if self._lock is not None:
            self._lock.announce(address)

    def close(self) -> None:
        self._db.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None


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

    def stages(self, entry: Entry) -> bool:
        return False

    def write_blob(self, payload: Blob) -> str:
        raise StoreError("a store in memory keeps payloads in memory")

    def arriving_blob(self, size: int) -> Spill | None:
        return None

    def remove_blob(self, name: str) -> None:
        pass

    def read_blob(self, name: str) -> Blob:
        raise StoreError("a store in memory keeps payloads in memory")

    def commit(self, entry: Entry, previous: int = 0, file: str | None = None) -> None:
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

    def announce(self, address: str) -> None:
        """Nothing to say: a store in memory is this process's alone."""

    def close(self) -> None:
        self._versions.clear()


def open_store(path: str) -> Store:
    """Open (creating if needed) the store at ``path``; ``:memory:`` keeps nothing."""
    if path == MEMORY:
        return MemoryStore()
    return SQLiteStore(path)
