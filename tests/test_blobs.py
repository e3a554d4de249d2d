"""Big payloads in files of their own: durable, swept, private, and off the row writer."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from clustorage.blobs import FILE_THRESHOLD
from clustorage.messages import VALUE, Entry
from clustorage.store import SQLiteStore
from clustorage.writer import StoreWriter
from clustorage.writes import commit_entry

pytestmark = pytest.mark.timeout(60)

BIG = os.urandom(FILE_THRESHOLD + 1)


def value(version: int, payload: bytes) -> Entry:
    return Entry(VALUE, "k", version, payload, None, "m", 1.0)


def files(path: Path) -> list[str]:
    return sorted(p.name for p in Path(f"{path}.blobs").iterdir())


def test_a_big_payload_lives_in_a_private_file_and_comes_back(tmp_path: Path) -> None:
    """A payload over the threshold is stored as a 0600 file and read back whole."""
    path = tmp_path / "s.sqlite3"
    store = SQLiteStore(str(path))
    commit_entry(store, value(1, BIG), 0)
    assert len(files(path)) == 1
    folder = Path(f"{path}.blobs")
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder / files(path)[0]).stat().st_mode & 0o777 == 0o600
    store.close()
    again = SQLiteStore(str(path))
    (current,) = again.current()
    assert bytes(current.payload) == BIG
    assert bytes(again.history(VALUE, "k")[0].payload) == BIG
    again.close()


def test_a_new_version_or_a_deletion_removes_the_old_file(tmp_path: Path) -> None:
    """Only the current version of a value keeps its payload: older files go."""
    path = tmp_path / "s.sqlite3"
    store = SQLiteStore(str(path))
    commit_entry(store, value(1, BIG), 0)
    first = files(path)
    commit_entry(store, value(2, BIG[::-1]), 1)
    assert len(files(path)) == 1 and files(path) != first
    store.delete(VALUE, "k", 3, "m")
    assert files(path) == []
    store.close()


def test_files_no_row_names_are_swept_at_open(tmp_path: Path) -> None:
    """A file left by a write cut short (kill -9 before its row) is removed at the next open."""
    path = tmp_path / "s.sqlite3"
    SQLiteStore(str(path)).close()
    stray = Path(f"{path}.blobs") / "0123abcd.partial"
    stray.write_bytes(b"half")
    orphan = Path(f"{path}.blobs") / "feedface"
    orphan.write_bytes(b"no row")
    SQLiteStore(str(path)).close()
    assert files(path) == []


def test_a_big_write_holds_up_no_small_one(tmp_path: Path) -> None:
    """While a big payload's file is being written, a small write commits and is reported."""
    path = tmp_path / "s.sqlite3"
    store = SQLiteStore(str(path))
    gate = threading.Event()
    blob_write = store.write_blob

    def slow_write_blob(payload: bytes | memoryview) -> str:
        gate.wait(20)
        return blob_write(payload)

    store.write_blob = slow_write_blob  # type: ignore[method-assign]
    outcomes: list[tuple[str, BaseException | None]] = []
    reported = threading.Condition()

    def post(call: object) -> None:
        with reported:
            call()  # type: ignore[operator]
            reported.notify_all()

    writer = StoreWriter(store, post)
    writer.commit(value(1, BIG), 0, lambda stored, error: outcomes.append(("big", error)))
    small = Entry(VALUE, "small", 1, b"x" * (100 << 10), None, "m", 1.0)
    writer.commit(small, 0, lambda stored, error: outcomes.append(("small", error)))
    with reported:
        assert reported.wait_for(lambda: outcomes, 20)
    assert outcomes == [("small", None)]
    gate.set()
    with reported:
        assert reported.wait_for(lambda: len(outcomes) == 2, 20)
    assert outcomes[1] == ("big", None)
    writer.close()
    assert {e.key for e in store.current()} == {"k", "small"}
    store.close()


def test_a_file_cut_short_leaves_its_key_out_not_a_shorter_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A big payload's file shorter than written (a power cut): its key is left out, logged,
    and recorded as deleted (so that nodes holding it drop it); the file goes."""
    path = tmp_path / "s.sqlite3"
    store = SQLiteStore(str(path))
    commit_entry(store, value(1, BIG), 0)
    store.commit(Entry(VALUE, "other", 1, b"small", None, "m", 1.0))
    store.close()
    (name,) = files(path)
    with open(Path(f"{path}.blobs") / name, "r+b") as file:
        file.truncate(1000)
    again = SQLiteStore(str(path))
    assert [entry.key for entry in again.current()] == ["other"]
    assert "left out value 'k' version 1" in caplog.text
    assert again.last_versions()[(VALUE, "k")] == 2
    assert [entry.key for entry in again.current()] == ["other"]
    assert files(path) == []
    again.close()
