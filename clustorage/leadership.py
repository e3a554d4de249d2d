"""Which loader of a name is active, when several share one PostgreSQL store.

The active loader holds a session advisory lock on a connection of its own: PostgreSQL frees
it the moment that session ends (the process died, or its host was taken for dead: see
:func:`clustorage.pgstore.connect`). Taking the lock bumps the leader row's epoch, the
fencing token every write of the store checks (clustorage.pgstore), and records the
address members are sent to. A loader that loses its lock connection steps down.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import psycopg

from .errors import StoreError
from .pgstore import connect

__all__ = ["Leadership"]

log = logging.getLogger(__name__)


class Leadership:
    """The lock of loader ``name`` in the database at ``url``."""

    def __init__(self, url: str, name: str, dead_after: float) -> None:
        self.url = url
        self.name = name
        self.dead_after = dead_after
        self._db: Any = None

    def _connection(self) -> Any:
        if self._db is None or self._db.closed or self._db.broken:
            self.drop()
            self._db = connect(
                self.url, self.dead_after, application_name=f"clustorage-{self.name}"
            )
        return self._db

    def acquire(self, address: str) -> int | None:
        """Take the lock if it is free: the new epoch, else None.

        Raises:
            StoreError: the database cannot be reached.
        """
        try:
            db = self._connection()
            got = db.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (f"clustorage/{self.name}",)
            ).fetchone()[0]
            if not got:
                return None
            row = db.execute(
                "INSERT INTO clustorage_leader (loader, epoch, address, since) "
                "VALUES (%s, 1, %s, %s) ON CONFLICT (loader) DO UPDATE SET "
                "epoch = clustorage_leader.epoch + 1, address = EXCLUDED.address, "
                "since = EXCLUDED.since RETURNING epoch",
                (self.name, address, time.time()),
            ).fetchone()
        except psycopg.Error as exc:
            self.drop()
            raise StoreError(f"cannot take the lock of {self.name}: {exc}") from exc
        return int(row[0])

    def active(self) -> str:
        """The address of the active loader, as it announced it ('' if none yet)."""
        try:
            row = (
                self._connection()
                .execute("SELECT address FROM clustorage_leader WHERE loader = %s", (self.name,))
                .fetchone()
            )
        except psycopg.Error as exc:
            self.drop()
            raise StoreError(f"cannot read the leader of {self.name}: {exc}") from exc
        return str(row[0]) if row else ""

    def holding(self) -> bool:
        """Whether the lock's session is still alive (a round trip on its connection)."""
        db = self._db
        if db is None or db.closed or db.broken:
            return False
        try:
            db.execute("SELECT 1").fetchone()
        except psycopg.Error as exc:
            log.warning("loader %s lost its PostgreSQL lock connection: %s", self.name, exc)
            self.drop()
            return False
        return True

    def drop(self) -> None:
        """Close the lock connection (which frees the lock, if held)."""
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(Exception):
                db.close()
