"""The loader's lease file, bytes on disk in and out: what a restarted loader finds of the
leases it had granted (clustorage.lease_file). With a loader killed -9 and restarted:
tests/test_promises.py."""

from __future__ import annotations

import resource
import signal
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from clustorage import lease_file
from clustorage.lease_file import LeaseFile

pytestmark = pytest.mark.timeout(30)


def at_once(call: Callable[[], None]) -> None:
    """The loop's call_later, as if the moment had passed at once."""
    call()


def test_what_was_granted_and_not_ended_is_found_again(tmp_path: Path) -> None:
    path = tmp_path / "app1.sqlite3.leases"
    book = LeaseFile(path, at_once)
    book.lease_granted("a", "m1", 5)
    book.lease_granted("b\nwith a newline", "m2", 1 << 40)
    book.lease_granted("c\udcff", "m3", 7)
    book.lease_ended("a")
    book.lease_granted("b\nwith a newline", "m4", 8)  # passed on
    # No close: as after a kill -9, what was written is what there is.
    again = LeaseFile(path, at_once)
    assert sorted(again.leases()) == [("b\nwith a newline", "m4", 8), ("c\udcff", "m3", 7)]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    book.close()
    again.close()


def test_a_line_cut_short_or_foreign_is_passed_over(tmp_path: Path) -> None:
    path = tmp_path / "leases"
    path.write_bytes(
        b'["granted", "kept", "m1", 3]\n'
        b'["granted", 5, "m1", 3]\n'
        b"not json at all\n"
        b'{"granted": "x"}\n'
        b'["ended"]\n'
        b'["granted", "cut", "m1", 4'
    )
    book = LeaseFile(path, at_once)
    assert book.leases() == [("kept", "m1", 3)]
    assert path.read_bytes() == b'["granted", "kept", "m1", 3]\n'  # rewritten at start
    book.close()


def test_the_file_is_rewritten_once_it_has_grown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lease_file, "REWRITE_AT", 1000)
    path = tmp_path / "leases"
    book = LeaseFile(path, at_once)
    for number in range(200):
        book.lease_granted(f"key{number}", "m1", number)
        book.lease_ended(f"key{number}")
    book.lease_granted("still", "m1", 1)
    assert path.stat().st_size < 1000 + 100
    assert LeaseFile(path, at_once).leases() == [("still", "m1", 1)]
    book.close()


def test_a_file_that_cannot_be_written_leaves_the_loader_without_one(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    assert LeaseFile.open(blocked / "leases", at_once) is None


def test_grants_are_written_a_moment_later_in_one_write(tmp_path: Path) -> None:
    """The holder hears of its lease first; the lines follow, together, when the loop
    calls back."""
    path = tmp_path / "leases"
    due: list[Callable[[], None]] = []
    book = LeaseFile(path, due.append)
    book.lease_granted("a", "m1", 1)
    book.lease_granted("b", "m1", 2)
    assert len(due) == 1 and path.read_bytes() == b""
    due.pop()()
    assert sorted(LeaseFile(path, at_once).leases()) == [("a", "m1", 1), ("b", "m1", 2)]


def test_a_lease_that_ends_before_its_write_writes_nothing(tmp_path: Path) -> None:
    """A quick fn's lease ends before its grant is written: no line for it, nor for its
    end, while a lease that outlives the moment is written, and its end after it."""
    path = tmp_path / "leases"
    due: list[Callable[[], None]] = []
    book = LeaseFile(path, due.append)
    book.lease_granted("quick", "m1", 1)
    book.lease_granted("slow", "m1", 2)
    book.lease_ended("quick")
    due.pop()()
    assert path.read_bytes() == b'["granted", "slow", "m1", 2]\n'
    book.lease_ended("slow")
    book.lease_granted("slow", "m2", 3)  # passed on, then ended before its write
    book.lease_ended("slow")
    due.pop()()
    assert path.read_bytes() == b'["granted", "slow", "m1", 2]\n["ended", "slow"]\n'
    book.lease_granted("slow", "m3", 4)
    book.close()  # a clean stop writes what is due
    assert LeaseFile(path, at_once).leases() == [("slow", "m3", 4)]


def test_a_write_cut_short_is_followed_by_the_file_anew(tmp_path: Path) -> None:
    """A disk that fills mid-line: once there is room, the file holds every lease again,
    not half a line with the next one spoilt behind it."""
    path = tmp_path / "leases"
    book = LeaseFile(path, at_once)
    book.lease_granted("a", "m1", 1)
    size = path.stat().st_size
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, limits[1]))
        book.lease_granted("b", "m2", 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    book.lease_granted("c", "m3", 3)
    expected = [("a", "m1", 1), ("b", "m2", 2), ("c", "m3", 3)]
    assert sorted(LeaseFile(path, at_once).leases()) == expected


def test_appends_not_the_leases_held_call_for_a_rewrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leases held past the rewrite size do not make every later write a rewrite."""
    monkeypatch.setattr(lease_file, "REWRITE_AT", 1000)
    path = tmp_path / "leases"
    book = LeaseFile(path, at_once)
    for number in range(100):  # about 3 kB held
        book.lease_granted(f"key{number}", "m1", number)
    rewritten = path.stat().st_ino
    book.lease_granted("one more", "m1", 1)
    assert path.stat().st_ino == rewritten


def test_a_written_grant_passed_on_then_ended_before_the_next_write_is_ended(
    tmp_path: Path,
) -> None:
    """m1's grant is written; the lease passes to m2, whose fn fails at once: the file no
    longer says m1 computes the key."""
    path = tmp_path / "leases"
    due: list[Callable[[], None]] = []
    book = LeaseFile(path, due.append)
    book.lease_granted("k", "m1", 1)
    due.pop()()
    book.lease_granted("k", "m2", 2)  # passed on
    book.lease_ended("k")
    due.pop()()
    assert lease_file._read(path) == {}
    book.lease_granted("k", "m3", 3)
    due.pop()()
    book.lease_granted("k", "m4", 4)  # passed on, and not ended
    due.pop()()
    assert lease_file._read(path) == {"k": ("m4", 4)}
    book.close()
