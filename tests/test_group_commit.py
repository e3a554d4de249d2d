"""The loader's small store writes of one loop pass commit in one transaction, each still
answered on its own: a write that fails fails only its own request."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clustorage.errors import StoreError, ValueTooLarge
from clustorage.messages import VALUE, Entry
from clustorage.store import SQLiteStore
from clustorage.writer import INLINE_LIMIT, StoreWriter
from clustorage.writes import commit_entry
from tests.disk_helpers import fill, small_disk

pytestmark = pytest.mark.timeout(60)

Outcomes = list[tuple[str, BaseException | None]]


def value(key: str, payload: bytes = b"v") -> Entry:
    return Entry(VALUE, key, 1, payload, None, "m", 1.0)


def copy_the_log_in(store: SQLiteStore) -> None:
    """Copy the store's write-ahead log into its file and empty it (a checkpoint)."""
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def logged_in_place(store: SQLiteStore, count: int) -> Path:
    """``count`` values of 1000 bytes committed and copied into the store's file, then half
    of them deleted: a log whose pages that file holds (copying it in takes no room). The
    log's path."""
    for i in range(count):
        commit_entry(store, value(f"s{i}", os.urandom(1000)), 0)
    copy_the_log_in(store)
    for i in range(count // 2):
        store.delete(VALUE, f"s{i}", 2, "m")
    return Path(store.path + "-wal")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(str(tmp_path / "s.sqlite3"), max_length=4096)
    yield store
    store.close()


def counting_transactions(store: SQLiteStore) -> list[int]:
    """A list that gets an item for every transaction the store opens."""
    opened: list[int] = []
    transaction = store.transaction

    def counted() -> object:
        opened.append(1)
        return transaction()

    store.transaction = counted  # type: ignore[method-assign,assignment]
    return opened


def commit_each(writer: StoreWriter, entries: list[Entry], outcomes: Outcomes) -> None:
    for entry in entries:

        def done(stored: object, error: BaseException | None, key: str = entry.key) -> None:
            outcomes.append((key, error))

        writer.commit(entry, 0, done)


def test_the_small_writes_of_one_pass_commit_together(store: SQLiteStore) -> None:
    """Three puts handled in one pass: nothing is written until the loop comes round, then
    one transaction holds all three, and each is answered."""
    opened = counting_transactions(store)
    soon: list[Callable[[], None]] = []
    writer = StoreWriter(store, lambda call: call(), soon=soon.append)
    outcomes: Outcomes = []
    commit_each(writer, [value("a"), value("b"), value("c")], outcomes)
    assert not outcomes and len(soon) == 1 and store.current() == []
    soon.pop()()
    assert outcomes == [("a", None), ("b", None), ("c", None)]
    assert len(opened) == 1
    assert sorted(entry.key for entry in store.current()) == ["a", "b", "c"]
    writer.close()


def test_a_write_that_fails_in_a_group_fails_alone(store: SQLiteStore) -> None:
    """An entry over what a row holds is refused; the others of its pass are stored."""
    soon: list[Callable[[], None]] = []
    writer = StoreWriter(store, lambda call: call(), soon=soon.append)
    outcomes: Outcomes = []
    commit_each(writer, [value("a"), value("big", b"x" * 5000), value("c")], outcomes)
    soon.pop()()
    assert [key for key, _ in outcomes] == ["a", "big", "c"]
    assert outcomes[0][1] is None and outcomes[2][1] is None
    assert isinstance(outcomes[1][1], ValueTooLarge)
    assert sorted(entry.key for entry in store.current()) == ["a", "c"]
    writer.close()


def test_writes_gathered_when_the_loop_stops_are_still_written(store: SQLiteStore) -> None:
    """Closing the writer writes what a pass gathered (nobody is told any more)."""
    soon: list[Callable[[], None]] = []
    writer = StoreWriter(store, lambda call: call(), soon=soon.append)
    outcomes: Outcomes = []
    commit_each(writer, [value("a"), value("b")], outcomes)
    writer.close()
    assert sorted(entry.key for entry in store.current()) == ["a", "b"]
    assert not outcomes


def test_without_a_loop_each_small_write_runs_at_once(store: SQLiteStore) -> None:
    """A writer not told how to defer (no ``soon``) writes each small entry on the spot."""
    writer = StoreWriter(store, lambda call: call())
    outcomes: Outcomes = []
    commit_each(writer, [value("a")], outcomes)
    assert outcomes == [("a", None)]
    writer.close()


def test_a_deletion_in_a_group_on_a_full_disk_goes_through_alone(tmp_path: Path) -> None:
    """On a full disk a pass's put and deletion fail together; written one by one, the put
    fails saying the disk is full, and the deletion gets the room kept for deletions,
    commits and removes its value's file."""
    with small_disk(tmp_path / "disk", "8m") as disk:
        store = SQLiteStore(str(disk / "s.sqlite3"))
        try:
            commit_entry(store, value("big", os.urandom(2 << 20)), 0)
            fill(disk)
            opened = counting_transactions(store)
            soon: list[Callable[[], None]] = []
            writer = StoreWriter(store, lambda call: call(), soon=soon.append)
            outcomes: Outcomes = []
            commit_each(writer, [value("small", b"x" * 3000)], outcomes)
            writer.delete(VALUE, "big", 2, "m", lambda error: outcomes.append(("big", error)))
            soon.pop()()
            writer.close()
            assert len(opened) == 1 and outcomes[1] == ("big", None)
            assert outcomes[0][0] == "small" and "full" in str(outcomes[0][1])
            assert store.current() == [] and list((disk / "s.sqlite3.blobs").iterdir()) == []
        finally:
            store.close()


def test_a_put_grouped_after_a_deletion_on_a_full_disk_leaves_it_the_room(
    tmp_path: Path,
) -> None:
    """On a full disk a pass's deletion and put, written one by one, are a deletion that
    spends the room kept for deletions and a put that may not take it: the room is set
    aside again first (from the room the store's log gave back), and the put, refused
    saying the disk is full, leaves it to the next deletion."""
    with small_disk(tmp_path / "disk", "16m") as disk:
        store = SQLiteStore(str(disk / "s.sqlite3"))
        try:
            for key in ("a", "b"):
                commit_entry(store, value(key, b"x" * 3000), 0)
            copy_the_log_in(store)  # it gives back no room: the deletion needs the room kept
            fill(disk)
            soon: list[Callable[[], None]] = []
            writer = StoreWriter(store, lambda call: call(), soon=soon.append)
            outcomes: Outcomes = []
            writer.delete(VALUE, "a", 2, "m", lambda error: outcomes.append(("a", error)))
            commit_each(writer, [value("small", b"y" * 3000)], outcomes)
            soon.pop()()
            assert outcomes[0] == ("a", None) and outcomes[1][0] == "small"
            assert "(database or disk is full)" in str(outcomes[1][1]), outcomes[1][1]
            assert (disk / "s.sqlite3.reserve").exists()  # set aside again, the log's room
            writer.delete(VALUE, "b", 2, "m", lambda error: outcomes.append(("b", error)))
            soon.pop()()
            writer.close()
            assert outcomes[2] == ("b", None) and store.current() == []
        finally:
            store.close()


class PausingStore(SQLiteStore):
    """Commits of key ``slow`` wait, inside their transaction, until ``resume`` is set."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.inside = threading.Event()
        self.resume = threading.Event()

    def commit(self, entry: Entry, previous: int = 0, file: str | None = None) -> None:
        if entry.key != "slow":
            super().commit(entry, previous, file)
            return
        with self.transaction():
            super().commit(entry, previous, file)
            self.inside.set()
            self.resume.wait(30)


def test_the_loop_never_writes_inside_the_row_writers_transaction(tmp_path: Path) -> None:
    """The loop found the row writer idle; before its pass's writes ran, a write too big for
    the loop went to the row writer, which began its transaction. The pass's writes wait
    for it (they share one connection): none is answered before it is committed."""
    store = PausingStore(str(tmp_path / "s.sqlite3"))
    soon: list[Callable[[], None]] = []
    writer = StoreWriter(store, lambda call: call(), soon=soon.append)
    outcomes: Outcomes = []
    commit_each(writer, [value("a"), value("b")], outcomes)
    idle = writer._rows.idle

    def idle_then_a_big_write() -> bool:
        answer = idle()
        writer._rows.idle = idle  # type: ignore[method-assign]
        commit_each(writer, [value("slow", b"x" * (INLINE_LIMIT + 1))], outcomes)
        assert store.inside.wait(30)
        return answer

    writer._rows.idle = idle_then_a_big_write  # type: ignore[method-assign]
    soon.pop()()
    assert outcomes == []
    store.resume.set()
    for _ in range(3000):
        if len(outcomes) == 3:
            break
        time.sleep(0.01)
    writer.close()
    assert sorted(outcomes, key=lambda outcome: outcome[0]) == [
        ("a", None),
        ("b", None),
        ("slow", None),
    ]
    assert sorted(entry.key for entry in store.current()) == ["a", "b", "slow"]
    store.close()


def test_a_write_that_fails_unexpectedly_is_answered(store: SQLiteStore) -> None:
    """Not a StoreError: its request is answered with one all the same, and the others of
    its pass are written."""
    soon: list[Callable[[], None]] = []
    writer = StoreWriter(store, lambda call: call(), soon=soon.append)
    outcomes: Outcomes = []
    commit = store.commit

    def failing(entry: Entry, previous: int = 0, file: str | None = None) -> None:
        if entry.key == "bad":
            raise RuntimeError("a bug in the store")
        commit(entry, previous, file)

    store.commit = failing  # type: ignore[method-assign]
    commit_each(writer, [value("a"), value("bad"), value("c")], outcomes)
    soon.pop()()
    assert [key for key, _ in outcomes] == ["a", "bad", "c"]
    assert outcomes[0][1] is None and outcomes[2][1] is None
    assert isinstance(outcomes[1][1], StoreError) and "a bug in the store" in str(outcomes[1][1])
    writer.close()


def test_a_put_refused_on_a_full_disk_leaves_the_deletions_their_room(tmp_path: Path) -> None:
    """A deletion spends the room kept for deletions; a put refused after it, whose store's
    log holds pages past the end of the store's file, takes none of what is left: the
    deletions after it go through."""
    with small_disk(tmp_path / "disk", "16m") as disk:
        store = SQLiteStore(str(disk / "s.sqlite3"))
        try:
            for i in range(5):
                commit_entry(store, value(f"s{i}", b"x" * 100), 0)
            copy_the_log_in(store)
            for i in range(2):  # new pages, in the log only
                commit_entry(store, value(f"big{i}", os.urandom(800_000)), 0)
            fill(disk)
            store.delete(VALUE, "s0", 2, "m")
            assert not (disk / "s.sqlite3.reserve").exists()
            with pytest.raises(StoreError, match="is full"):
                commit_entry(store, value("x", b"y" * 1000), 0)
            for key in ("s1", "s2", "big0"):
                store.delete(VALUE, key, 2, "m")
            assert sorted(entry.key for entry in store.current()) == ["big1", "s3", "s4"]
        finally:
            store.close()


def test_a_refused_put_leaves_the_store_its_logs_room(tmp_path: Path) -> None:
    """A put refused because the room for deletions cannot be set aside again gives the
    write-ahead log's room back to the disk only when that lets it be: else the room stays
    the store's own, for the deletions that come next (another program could take it)."""
    with small_disk(tmp_path / "disk", "64m") as disk:
        store = SQLiteStore(str(disk / "s.sqlite3"))
        try:
            wal = logged_in_place(store, 300)
            logged = wal.stat().st_blocks
            assert logged
            fill(disk, "first")
            (disk / "s.sqlite3.reserve").unlink()  # as a deletion that spent it would
            fill(disk, "second")
            time.sleep(1.1)  # past reserve.LOOK_EVERY: the put looks at the file
            with pytest.raises(StoreError, match="bytes it keeps for deletions are free"):
                commit_entry(store, value("x", b"y" * 1000), 0)
            assert wal.stat().st_blocks == logged
        finally:
            store.close()


def test_a_reserve_that_cannot_be_made_leaves_the_log_alone(tmp_path: Path) -> None:
    """Where the room for deletions cannot be set aside for another reason than a full disk
    (a directory in the way), a put is refused saying so, and the write-ahead log is left
    as it is: its room would not help."""
    store = SQLiteStore(str(tmp_path / "s.sqlite3"))
    try:
        wal = logged_in_place(store, 40)
        logged = wal.stat().st_size
        reserve = tmp_path / "s.sqlite3.reserve"
        reserve.unlink()
        reserve.mkdir()
        time.sleep(1.1)  # past reserve.LOOK_EVERY: the put looks at the file
        with pytest.raises(StoreError, match="could not set aside room for deletions"):
            commit_entry(store, value("x", b"y"), 0)
        assert logged and wal.stat().st_size == logged
    finally:
        store.close()
