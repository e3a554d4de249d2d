"""The loader's stores: SQLiteStore and MemoryStore follow the same rules."""

from __future__ import annotations

import gc
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from clustorage.errors import StoreError, ValueTooLarge
from clustorage.messages import FUNCTION, VALUE, Blob, Entry
from clustorage.store import MemoryStore, SQLiteStore, Store, open_store

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=["sqlite", "memory", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Each store implementation, fresh."""
    made: Store
    if request.param == "postgresql":
        from clustorage.pgstore import PostgresStore

        made = PostgresStore(request.getfixturevalue("pg_url"), "app1")
    elif request.param == "sqlite":
        made = SQLiteStore(str(tmp_path / "s.sqlite3"))
    else:
        made = MemoryStore()
    yield made
    made.close()


def entry(kind: str, key: str, version: int, payload: Blob, source: str | None = None) -> Entry:
    return Entry(kind, key, version, payload, source, "m1", 1000.0 + version)


def payloads(store: Store, kind: str, key: str) -> list[bytes]:
    return [bytes(e.payload) for e in store.history(kind, key)]


def test_current_and_last_versions(store: Store) -> None:
    """current() has each key's latest undeleted version; last_versions() its highest ever."""
    store.commit(entry(VALUE, "a", 1, b"a1"))
    store.commit(entry(VALUE, "a", 2, b"a2"), previous=1)
    store.commit(entry(FUNCTION, "a", 1, b"f1", "def a(): pass"))
    store.commit(entry(VALUE, "b", 1, b"b1"))
    store.delete(VALUE, "b", 2, "m2")
    current = {(e.kind, e.key): (e.version, bytes(e.payload)) for e in store.current()}
    assert current == {(VALUE, "a"): (2, b"a2"), (FUNCTION, "a"): (1, b"f1")}
    assert store.last_versions() == {(VALUE, "a"): 2, (FUNCTION, "a"): 1, (VALUE, "b"): 2}


def test_value_commit_drops_previous_payload(store: Store) -> None:
    """A new value version empties the previous payload but keeps its history row."""
    store.commit(entry(VALUE, "k", 1, b"one"))
    store.commit(entry(VALUE, "k", 2, b"two"), previous=1)
    assert [e.version for e in store.history(VALUE, "k")] == [1, 2]
    assert payloads(store, VALUE, "k") == [b"", b"two"]


def test_function_versions_keep_payload_and_source(store: Store) -> None:
    """A new function version leaves older versions' payload and source intact."""
    store.commit(entry(FUNCTION, "f", 1, b"p1", "def f(): return 1"))
    store.commit(entry(FUNCTION, "f", 2, b"p2", "def f(): return 2"), previous=1)
    history = store.history(FUNCTION, "f")
    assert payloads(store, FUNCTION, "f") == [b"p1", b"p2"]
    assert [e.source for e in history] == ["def f(): return 1", "def f(): return 2"]


@pytest.mark.parametrize("kind", [VALUE, FUNCTION])
def test_delete_records_tombstone(store: Store, kind: str) -> None:
    """delete() hides the key, counts the tombstone version and ends history with it."""
    store.commit(entry(kind, "k", 1, b"one", "src1"))
    store.commit(entry(kind, "k", 2, b"two", "src2"), previous=1)
    store.delete(kind, "k", 3, "deleter")
    assert store.current() == []
    assert store.last_versions() == {(kind, "k"): 3}
    history = store.history(kind, "k")
    assert [e.version for e in history] == [1, 2, 3]
    last = history[-1]
    assert (bytes(last.payload), last.source, last.origin) == (b"", None, "deleter")
    expected = [b"", b"", b""] if kind == VALUE else [b"one", b"two", b""]
    assert payloads(store, kind, "k") == expected


def test_history_order_and_unknown_key(store: Store) -> None:
    """history() is oldest first, separate per kind, and [] for an unknown key."""
    for version in (1, 2, 3):
        store.commit(entry(FUNCTION, "f", version, b"p%d" % version), previous=version - 1)
    assert [e.version for e in store.history(FUNCTION, "f")] == [1, 2, 3]
    assert store.history(VALUE, "f") == []
    assert store.history(FUNCTION, "nope") == []


def test_memoryview_payload(store: Store) -> None:
    """A memoryview payload is accepted and reads back equal to its bytes."""
    store.commit(entry(VALUE, "v", 1, memoryview(b"view-bytes")))
    store.commit(entry(FUNCTION, "f", 1, memoryview(b"fn-bytes"), "def f(): pass"))
    got = {e.key: bytes(e.payload) for e in store.current()}
    assert got == {"v": b"view-bytes", "f": b"fn-bytes"}
    assert payloads(store, VALUE, "v") == [b"view-bytes"]


def test_open_store_memory() -> None:
    """open_store(':memory:') gives a MemoryStore."""
    assert isinstance(open_store(":memory:"), MemoryStore)


def test_open_store_sqlite_survives_reopen(tmp_path: Path) -> None:
    """open_store(path) gives a SQLiteStore whose data survives close() and reopening."""
    path = str(tmp_path / "sub" / "s.sqlite3")
    first = open_store(path)
    assert isinstance(first, SQLiteStore)
    first.commit(entry(VALUE, "k", 1, b"one"))
    first.commit(entry(VALUE, "k", 2, b"two"), previous=1)
    first.commit(entry(FUNCTION, "f", 1, b"fn", "def f(): pass"))
    first.delete(FUNCTION, "f", 2, "m2")
    first.close()
    second = open_store(path)
    try:
        assert [(e.key, bytes(e.payload)) for e in second.current()] == [("k", b"two")]
        assert second.last_versions() == {(VALUE, "k"): 2, (FUNCTION, "f"): 2}
        assert payloads(second, VALUE, "k") == [b"", b"two"]
    finally:
        second.close()


def test_an_entry_over_the_stores_limit_is_refused_and_nothing_stored(tmp_path: Path) -> None:
    """An entry over what one row holds raises ValueTooLarge naming the limit, before SQLite
    sees it; nothing is stored, and an entry under the limit still is."""
    store = SQLiteStore(str(tmp_path / "s.sqlite3"), max_length=100_000)
    try:
        with pytest.raises(ValueTooLarge, match="over the 100000 bytes one entry can take"):
            store.commit(entry(VALUE, "big", 1, b"x" * 100_000))
        assert store.history(VALUE, "big") == []
        store.commit(entry(VALUE, "big", 1, b"x" * 90_000))
        assert payloads(store, VALUE, "big") == [b"x" * 90_000]
    finally:
        store.close()


def test_one_store_one_loader_in_a_process_too(tmp_path: Path) -> None:
    """A second SQLiteStore on one file fails with StoreError naming the holder; closing
    the first, or dropping it unclosed, lets the next one in."""
    path = str(tmp_path / "s.sqlite3")
    first = SQLiteStore(path)
    first.announce("127.0.0.1:4370")
    with pytest.raises(StoreError, match=r"in use by another loader \(pid \d+, listening on "):
        SQLiteStore(path)
    first.close()
    second = SQLiteStore(path)
    del second  # never closed: the lock goes with it
    gc.collect()
    SQLiteStore(path).close()


def test_a_store_an_earlier_version_made_opens_and_takes_writes(tmp_path: Path) -> None:
    """A store whose entries table an earlier version made (a rowid table, without the file
    column) opens with its entries, and takes new versions."""
    path = tmp_path / "s.sqlite3"
    made = sqlite3.connect(path)
    made.executescript(
        """
        CREATE TABLE entries (
            kind TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL, payload BLOB,
            source TEXT, origin TEXT NOT NULL, time REAL NOT NULL,
            deleted INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (kind, key, version)
        );
        CREATE TABLE identity (id TEXT NOT NULL);
        INSERT INTO identity (id) VALUES ('earlier');
        INSERT INTO entries (kind, key, version, payload, source, origin, time)
            VALUES ('value', 'k', 1, X'6F6E65', NULL, 'm1', 1001.0);
        """
    )
    made.close()
    store = SQLiteStore(str(path))
    try:
        assert store.identity == "earlier"
        assert [(e.key, bytes(e.payload)) for e in store.current()] == [("k", b"one")]
        store.commit(entry(VALUE, "k", 2, b"two"), previous=1)
        store.delete(VALUE, "gone", 1, "m1")
        assert payloads(store, VALUE, "k") == [b"", b"two"]
        assert store.last_versions() == {(VALUE, "k"): 2, (VALUE, "gone"): 1}
    finally:
        store.close()
