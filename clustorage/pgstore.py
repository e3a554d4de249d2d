"""The loader's store in PostgreSQL, for loaders with standbys (SPEC "High availability").

The only module besides :mod:`clustorage.leadership` that imports psycopg (an optional
extra: ``pip install clustorage[postgres]``). Same rules as the SQLite store: every version
is a row, deletions are tombstone rows, a value's previous payload is dropped while its
history stays. Several loaders of one name share the rows of that name; only the active one
writes, and every write checks, inside its transaction, that the leader row still carries
this loader's epoch (its fencing token): a former active that lost the lock cannot commit.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import codec
from .bulk import Spill
from .errors import StoreError, ValueTooLarge
from .messages import VALUE, Blob, Entry

try:
    import psycopg
except ImportError:  # pragma: no cover - the extra is not installed
    psycopg = None  # type: ignore[assignment]

__all__ = ["POSTGRES_SCHEMES", "PostgresStore", "is_postgres", "redacted", "require_psycopg"]

log = logging.getLogger(__name__)

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# A bytea holds at most 1 GiB; keep room for the row's other columns.
MAX_ROW = (1 << 30) - (1 << 16)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clustorage_entries (
    loader   TEXT             NOT NULL,
    kind     TEXT             NOT NULL,
    key      TEXT             NOT NULL,
    version  BIGINT           NOT NULL,
    payload  BYTEA,
    source   TEXT,
    origin   TEXT             NOT NULL,
    time     DOUBLE PRECISION NOT NULL,
    deleted  BOOLEAN          NOT NULL DEFAULT false,
    PRIMARY KEY (loader, kind, key, version)
);
CREATE TABLE IF NOT EXISTS clustorage_identity (
    loader TEXT PRIMARY KEY,
    id     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS clustorage_leases (
    loader TEXT             NOT NULL,
    key    TEXT             NOT NULL,
    holder TEXT             NOT NULL,
    token  NUMERIC          NOT NULL,
    since  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (loader, key)
);
-- A token carries its key's version above 64 bits (clustorage.leases): wider than BIGINT.
-- Altered once (an ALTER locks the table, even to the type it has).
DO $$ BEGIN
    IF (SELECT data_type FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = 'clustorage_leases'
        AND column_name = 'token') = 'bigint' THEN
        ALTER TABLE clustorage_leases ALTER COLUMN token TYPE NUMERIC;
    END IF;
END $$;
CREATE TABLE IF NOT EXISTS clustorage_leader (
    loader  TEXT PRIMARY KEY,
    epoch   BIGINT           NOT NULL,
    address TEXT             NOT NULL,
    since   DOUBLE PRECISION NOT NULL
);
"""

_CURRENT = """
SELECT kind, key, version, payload, source, origin, time FROM clustorage_entries AS e
WHERE loader = %s AND NOT deleted AND version = (
    SELECT MAX(version) FROM clustorage_entries
    WHERE loader = e.loader AND kind = e.kind AND key = e.key)
"""


def is_postgres(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL store rather than a SQLite directory."""
    return url.startswith(POSTGRES_SCHEMES)


def redacted(url: str) -> str:
    """``url`` without its password, for logs and status."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def require_psycopg() -> None:
    """Raise StoreError saying how to install psycopg when it is missing."""
    if psycopg is None:
        raise StoreError("a PostgreSQL store needs psycopg 3: pip install 'clustorage[postgres]'")


def connect(url: str, dead_after: float, **options: Any) -> Any:
    """A psycopg connection (autocommit) whose host is taken for dead within ``dead_after``
    seconds, on this side (tcp_user_timeout, keepalives) and on the server's (its session's
    keepalive settings), so that a partitioned loader's session, and its lock, ends."""
    require_psycopg()
    idle = max(1, int(dead_after / 3))
    interval = max(1, int(dead_after / 6))
    count = max(1, int((dead_after / 2) / interval))
    user_timeout = max(1000, int(dead_after * 1000 / 2))
    server = (
        f"-c tcp_keepalives_idle={idle} -c tcp_keepalives_interval={interval} "
        f"-c tcp_keepalives_count={count} -c tcp_user_timeout={user_timeout}"
    )
    return psycopg.connect(
        url,
        autocommit=True,
        connect_timeout=max(2, int(dead_after / 2)),
        keepalives=1,
        keepalives_idle=idle,
        keepalives_interval=interval,
        keepalives_count=count,
        tcp_user_timeout=user_timeout,
        options=server,
        **options,
    )


class PostgresStore:
    """A :class:`~clustorage.store.Store` in PostgreSQL, the rows of loader ``name``.

    ``epoch`` is the fencing token: None writes unchecked (a store used alone, as in
    tests); a number makes every write check it against the leader row.

    Raises:
        StoreError: the database cannot be reached or its tables made.
    """

    ends_with_value = True  # a value's commit deletes its lease's row (LeaseBook)

    def __init__(self, url: str, name: str, dead_after: float = 15.0) -> None:
        self.url = url
        self.path = redacted(url)
        self.name = name
        self.epoch: int | None = None
        self._dead_after = dead_after
        self._lock = threading.RLock()
        self._depth = 0  # transaction() nesting: writes inside it join it
        self._db: Any = None
        with self._lock:
            self._connect()
            self.identity = self._identity()

    def _error(self, exc: BaseException) -> StoreError:
        return StoreError(f"the loader could not use its PostgreSQL store {self.path}: {exc}")

    def _connect(self) -> Any:
        if self._db is not None and not self._db.closed and not self._db.broken:
            return self._db
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()
        try:
            self._db = connect(self.url, self._dead_after)
            with self._db.transaction():
                # One set-up at a time: CREATE TABLE IF NOT EXISTS races with itself.
                self._db.execute("SELECT pg_advisory_xact_lock(7245307125)")
                self._db.execute(_SCHEMA)
        except psycopg.Error as exc:
            self._db = None
            raise self._error(exc) from exc
        return self._db

    def _identity(self) -> str:
        db = self._connect()
        try:
            db.execute(
                "INSERT INTO clustorage_identity (loader, id) VALUES (%s, %s) "
                "ON CONFLICT (loader) DO NOTHING",
                (self.name, secrets.token_hex(16)),
            )
            row = db.execute(
                "SELECT id FROM clustorage_identity WHERE loader = %s", (self.name,)
            ).fetchone()
        except psycopg.Error as exc:
            raise self._error(exc) from exc
        return str(row[0])

    def _read(self, sql: str, args: tuple[object, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._connect().execute(sql, args).fetchall())
            except psycopg.Error as exc:
                raise self._error(exc) from exc

    @staticmethod
    def _entry(row: tuple[Any, ...]) -> Entry:
        kind, key, version, payload, source, origin, when = row
        return Entry(kind, key, int(version), payload or b"", source, origin, float(when))

    def current(self) -> list[Entry]:
        """The latest, undeleted version of every key."""
        return [self._entry(row) for row in self._read(_CURRENT, (self.name,))]

    def last_versions(self) -> dict[tuple[str, str], int]:
        """The highest version ever used for each key, deleted ones included."""
        rows = self._read(
            "SELECT kind, key, MAX(version) FROM clustorage_entries WHERE loader = %s "
            "GROUP BY kind, key",
            (self.name,),
        )
        return {(kind, key): int(version) for kind, key, version in rows}

    def stages(self, entry: Entry) -> bool:
        return False  # every payload lives in its row

    def write_blob(self, payload: Blob) -> str:
        raise StoreError("a PostgreSQL store keeps payloads in its rows")

    def arriving_blob(self, size: int) -> Spill | None:
        return None

    def remove_blob(self, name: str) -> None:
        pass

    def read_blob(self, name: str) -> Blob:
        raise StoreError("a PostgreSQL store keeps payloads in its rows")

    def _check_epoch(self, db: Any) -> None:
        if self.epoch is None:
            return
        row = db.execute(
            "SELECT epoch FROM clustorage_leader WHERE loader = %s FOR SHARE", (self.name,)
        ).fetchone()
        if row is None or int(row[0]) != self.epoch:
            raise StoreError(
                f"the loader's epoch {self.epoch} is over (now {row[0] if row else 'none'}): "
                f"another loader of {self.name} took over; nothing was stored"
            )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Every write inside commits together, or none does.

        Raises:
            StoreError: a write or the commit failed, or another loader took over.
        """
        with self._lock:
            if self._depth:
                yield
                return
            try:
                db = self._connect()
                with db.transaction():
                    self._check_epoch(db)
                    self._depth += 1
                    try:
                        yield
                    finally:
                        self._depth -= 1
            except psycopg.Error as exc:
                raise self._error(exc) from exc

    def _write(self, statements: list[tuple[str, tuple[object, ...]]], flush: bool = True) -> None:
        """Run ``statements`` in one transaction (or the one open); ``flush``: wait for the
        commit to reach the disk (a lease's record need not: it is seen at once by the
        next loader, and only a crash of the database itself could lose it)."""
        with self.transaction():
            try:
                if not flush:
                    self._db.execute("SET LOCAL synchronous_commit TO OFF")
                for sql, args in statements:
                    self._db.execute(sql, args)
            except psycopg.Error as exc:
                raise self._error(exc) from exc

    def commit(self, entry: Entry, previous: int = 0, file: str | None = None) -> None:
        """Make ``entry`` durable; a value's ``previous`` payload is dropped.

        Raises:
            ValueTooLarge: over what a row holds; nothing was stored.
            StoreError: the write failed, or another loader took over; nothing was stored.
        """
        if len(entry.payload) + len(entry.source or "") > MAX_ROW:
            raise ValueTooLarge(
                f"{entry.key!r} takes {len(entry.payload)} bytes, over the {MAX_ROW} bytes "
                f"one entry can take in the loader's store {self.path}; {codec.SPLIT_IT}"
            )
        statements: list[tuple[str, tuple[object, ...]]] = [
            (
                "INSERT INTO clustorage_entries "
                "(loader, kind, key, version, payload, source, origin, time) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (self.name, *entry[:3], bytes(entry.payload), *entry[4:]),
            )
        ]
        if entry.kind == VALUE and previous:
            statements.append(
                (
                    "UPDATE clustorage_entries SET payload = NULL "
                    "WHERE loader = %s AND kind = %s AND key = %s AND version = %s",
                    (self.name, entry.kind, entry.key, previous),
                )
            )
        if entry.kind == VALUE:  # the key has its value: whoever computed it is done
            statements.append(
                (
                    "DELETE FROM clustorage_leases WHERE loader = %s AND key = %s",
                    (self.name, entry.key),
                )
            )
        self._write(statements)

    def delete(self, kind: str, key: str, version: int, origin: str) -> None:
        """Record that ``key`` was deleted, as tombstone ``version``."""
        statements: list[tuple[str, tuple[object, ...]]] = [
            (
                "INSERT INTO clustorage_entries "
                "(loader, kind, key, version, payload, source, origin, time, deleted) "
                "VALUES (%s, %s, %s, %s, NULL, NULL, %s, %s, true)",
                (self.name, kind, key, version, origin, time.time()),
            )
        ]
        if kind == VALUE:
            statements.append(
                (
                    "UPDATE clustorage_entries SET payload = NULL "
                    "WHERE loader = %s AND kind = %s AND key = %s",
                    (self.name, kind, key),
                )
            )
        self._write(statements)

    def history(self, kind: str, key: str) -> list[Entry]:
        """Every version of ``key``, oldest first; deletions have payload ``b''``."""
        rows = self._read(
            "SELECT kind, key, version, payload, source, origin, time FROM clustorage_entries "
            "WHERE loader = %s AND kind = %s AND key = %s ORDER BY version",
            (self.name, kind, key),
        )
        return [self._entry(row) for row in rows]

    def lease_granted(self, key: str, holder: str, token: int) -> None:
        """Record that ``holder`` computes ``key`` under lease ``token``."""
        self._write(
            [
                (
                    "INSERT INTO clustorage_leases (loader, key, holder, token, since) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (loader, key) DO UPDATE SET "
                    "holder = EXCLUDED.holder, token = EXCLUDED.token, since = EXCLUDED.since",
                    (self.name, key, holder, token, time.time()),
                )
            ],
            flush=False,
        )

    def lease_ended(self, key: str) -> None:
        """Record that nobody computes ``key`` any more."""
        self._write(
            [("DELETE FROM clustorage_leases WHERE loader = %s AND key = %s", (self.name, key))],
            flush=False,
        )

    def leases(self) -> list[tuple[str, str, int]]:
        """Every lease recorded: ``(key, holder, token)``."""
        rows = self._read(
            "SELECT key, holder, token FROM clustorage_leases WHERE loader = %s", (self.name,)
        )
        return [(str(key), str(holder), int(token)) for key, holder, token in rows]

    def announce(self, address: str) -> None:
        """Nothing to say here: the leader row says who is active (clustorage.leadership)."""

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                with contextlib.suppress(Exception):
                    self._db.close()
                self._db = None
