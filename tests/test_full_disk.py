"""A full disk under the loader's store: puts fail saying how to make room, and deletions
still go through (the room kept aside for them), freeing their values' files."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import clustorage
from tests.conftest import COOKIE, Cluster, node_pair
from tests.disk_helpers import fill, small_disk
from tests.test_durability import wait_until

pytestmark = pytest.mark.timeout(90)

BIG = 2_000_000  # bytes: a value with a file of its own


def loader(disk: Path) -> clustorage.Node:
    return clustorage.Node("l", listen="127.0.0.1:0", data=str(disk), cookie=COOKIE)


def test_deleting_a_big_key_on_a_full_disk_frees_its_room(home: Path, tmp_path: Path) -> None:
    """On a disk full to the last byte a big put fails; deleting a big key that both nodes
    hold goes through and frees its file's room, so that the put then succeeds."""
    with small_disk(tmp_path / "disk", "16m") as disk, node_pair(data=str(disk)) as pair:
        first, second = pair
        second.put("old", os.urandom(BIG))
        assert len(first.get("old")) == len(second.get("old")) == BIG
        fill(disk)
        new = os.urandom(BIG * 9 // 10)  # the tombstone takes a page or two of the room
        with pytest.raises(clustorage.StoreError):
            second.put("new", new)
        assert second.delete("old")
        second.put("new", new)
        assert second.keys() == ["new"] and second.get("new") == new


@pytest.mark.parametrize("size", [1000, BIG], ids=["in-a-row", "in-a-file"])
def test_the_full_disk_error_names_the_data_directory_and_the_way_out(
    home: Path, tmp_path: Path, size: int
) -> None:
    """A put on a full disk, whether its value goes in a row or in a file of its own,
    fails naming the full data directory and how to make room; nothing is lost."""
    with small_disk(tmp_path / "disk", "16m") as disk, loader(disk) as node:
        node.put("kept", "yes")
        fill(disk)
        with pytest.raises(clustorage.StoreError) as failed:
            node.put("more", os.urandom(size))
        for way_out in (
            f"data directory {disk} is full",
            "node.delete(key)",
            "%cluster_delete KEY",
            "free space on that disk",
        ):
            assert way_out in str(failed.value)
        assert node.keys() == ["kept"] and node.get("kept") == "yes"


def test_the_room_for_deletions_is_set_aside_again_once_there_is_room(
    home: Path, tmp_path: Path
) -> None:
    """A deletion on a full disk spends the room kept for deletions; the next put sets it
    aside again first, so that the disk's next filling lets a deletion through too."""
    with small_disk(tmp_path / "disk", "16m") as disk, loader(disk) as node:
        reserve = disk / "l.sqlite3.reserve"
        for key in ("a", "b"):
            node.put(key, os.urandom(BIG))
        fill(disk, "first")
        assert node.delete("a")
        assert not reserve.exists()
        node.put("c", os.urandom(BIG // 2))
        assert reserve.exists()
        fill(disk, "second")
        assert node.delete("b")
        assert node.keys() == ["c"]


def test_a_loader_restarted_on_a_full_disk_can_delete(cluster: Cluster, tmp_path: Path) -> None:
    """The disk fills under a loader, which is killed (-9) and started again on the full
    disk: every key is back, a deletion goes through, and puts resume."""
    with small_disk(tmp_path / "disk", "16m") as disk:
        try:
            loader = cluster.start_loader(data=str(disk))
            member = cluster.member("m")
            member.ok(f"for key in 'abc': node.put(key, key.encode() * {BIG})")
            fill(disk)
            failed = member.send("node.put('d', b'd' * 1000)")
            assert failed["error"] == "StoreError" and "full" in failed["message"]
            os.kill(loader.pid, signal.SIGKILL)
            loader.wait(10)
            cluster.start_loader(data=str(disk))
            wait_until(lambda: member.ok("node.connected"), time.monotonic() + 30)
            assert member.ok("node.delete('a')") is True
            member.ok("node.put('d', b'd' * 1000)")
            assert member.ok("sorted(node.keys())") == ["b", "c", "d"]
            assert member.ok(f"node.get('c') == b'c' * {BIG}") is True
        finally:
            cluster.close()


def test_after_a_deletion_spends_the_room_puts_wait_for_room(home: Path, tmp_path: Path) -> None:
    """Deleting a small key or a function on a full disk frees no file: the room kept for
    deletions, given back to it, stays free for the next deletions; once another program
    takes what is left, puts (a row, a member's big value) are refused until the disk has
    room to set it aside again."""
    with small_disk(tmp_path / "disk", "64m") as disk, node_pair(data=str(disk)) as pair:
        first, second = pair
        reserve = disk / "l.sqlite3.reserve"
        for i in range(3):
            second.put(f"k{i}", os.urandom(2000))
        second.define("f", "lambda: 1")
        fillers = [fill(disk)]
        assert second.delete("k0")
        assert not reserve.exists()
        assert second.delete("f", kind="function") and second.delete("k1")
        fillers.append(fill(disk, "second"))
        for node, value in ((second, b"x" * 1000), (second, os.urandom(BIG)), (first, b"y")):
            with pytest.raises(
                clustorage.StoreError, match="bytes it keeps for deletions are free"
            ):
                node.put("new", value)
        for filler in fillers:
            filler.unlink()
        second.put("new", b"x" * 1000)
        assert reserve.stat().st_blocks * 512 == 4 << 20
        assert second.keys() == ["k2", "new"] and second.functions() == []


def test_a_loader_stopped_and_restarted_on_a_full_disk_can_delete(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A loader stopped cleanly (SIGTERM), its disk then filled, starts again with the room
    kept for deletions given back: a deletion goes through, and puts resume."""
    with small_disk(tmp_path / "disk", "16m") as disk:
        try:
            loader = cluster.start_loader(data=str(disk))
            member = cluster.member("m")
            member.ok(f"for key in 'ab': node.put(key, key.encode() * {BIG})")
            os.kill(loader.pid, signal.SIGTERM)
            assert loader.wait(10) == 0
            fill(disk)
            cluster.start_loader(data=str(disk))
            wait_until(lambda: member.ok("node.connected"), time.monotonic() + 30)
            assert member.ok("node.delete('a')") is True
            member.ok("node.put('c', b'c' * 1000)")
            assert member.ok("sorted(node.keys())") == ["b", "c"]
        finally:
            cluster.close()


def test_a_reserve_file_that_is_a_link_is_replaced(home: Path, tmp_path: Path) -> None:
    """A link where the room for deletions is kept holds no room on the store's disk: it is
    replaced by a file of its own (the file linked to left alone), so a deletion on a full
    disk still goes through."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"z" * (4 << 20))
    with small_disk(tmp_path / "disk", "16m") as disk:
        reserve = disk / "l.sqlite3.reserve"
        reserve.symlink_to(elsewhere)
        with loader(disk) as node:
            node.put("a", os.urandom(BIG))
            fill(disk)
            assert node.delete("a")
        assert elsewhere.read_bytes() == b"z" * (4 << 20) and not reserve.is_symlink()


def test_a_reserve_file_removed_by_hand_is_made_again(home: Path, tmp_path: Path) -> None:
    """The room for deletions, its file removed by hand, is set aside again by a later put,
    so that a deletion on a full disk still goes through."""
    with small_disk(tmp_path / "disk", "16m") as disk, loader(disk) as node:
        reserve = disk / "l.sqlite3.reserve"
        node.put("a", os.urandom(BIG))
        reserve.unlink()
        puts = iter(range(1000))
        wait_until(
            lambda: node.put(f"p{next(puts)}", 1) and reserve.exists(), time.monotonic() + 30
        )
        fill(disk)
        assert node.delete("a")


def small_values(node: clustorage.Node, count: int) -> list[str]:
    """``count`` keys of 1000-byte values, each in a row of the store; their names."""
    keys = [f"s{i}" for i in range(count)]
    for key in keys:
        node.put(key, os.urandom(1000))
    return keys


def test_deleting_small_keys_on_a_full_disk_lets_puts_resume(home: Path, tmp_path: Path) -> None:
    """Small values fill the store's disk until puts are refused; deleting them (rows, no
    file to remove) frees room inside the store, and the room its write-ahead log kept is
    given back to the disk: puts resume, a big value's first, as the refusal said."""
    with small_disk(tmp_path / "disk", "16m") as disk, loader(disk) as node:
        keys = small_values(node, 1200)
        fill(disk)
        refused = None
        for i in range(100):
            try:
                node.put(f"more{i}", os.urandom(1000))
            except clustorage.StoreError as exc:
                refused = exc
                break
        assert "delete keys you no longer need" in str(refused)
        for key in keys:
            assert node.delete(key)
        big = os.urandom(BIG)  # a file of its own, first: no row put before it
        node.put("big", big)
        for i in range(200):
            node.put(f"new{i}", os.urandom(1000))
        kept = node.keys()
        assert not set(keys) & set(kept)
        assert {"big", *(f"new{i}" for i in range(200))} <= set(kept)
        assert node.get("big") == big
