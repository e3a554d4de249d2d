"""Big values travel on demand: announced to every node, their bytes only to nodes that get
them (SPEC "Big values travel on demand"), across reconnects and loader restarts."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import Cluster, rss_kib

pytestmark = pytest.mark.timeout(180)

SIZE = 40_000_000
SMALL = 2_000_000  # well under SIZE: what a node reads besides the value itself


# What a member process runs to count the bytes its connection to the loader has received
# (the kernel's tcp_info.tcpi_bytes_received; a new connection counts from 0).
RECEIVED = (
    "import socket, struct\n"
    "def received():\n"
    "    info = node._channel._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)\n"
    "    return struct.unpack_from('Q', info, 128)[0]\n"
)


def received(member: object) -> int:
    """Bytes ``member``'s current connection to the loader has received."""
    return int(member.ok("received()"))  # type: ignore[attr-defined]


def settle(member: object, key: str) -> None:
    """Wait until ``member`` lists ``key`` (it heard of it)."""
    member.ok(  # type: ignore[attr-defined]
        "import time\n"
        "deadline = time.monotonic() + 30\n"
        f"while {key!r} not in node.keys() and time.monotonic() < deadline: time.sleep(0.05)"
    )


def test_a_node_that_never_gets_a_big_value_receives_none_of_its_bytes(
    cluster: Cluster,
) -> None:
    """A 40 MB put: every node lists the key at once, only the one that gets it reads it,
    once per version; after a loader kill -9 and restart, resyncs send none of it again."""
    loader = cluster.start_loader(data=str(cluster.tmp / "data"))
    writer, reader, idle = (cluster.member(name) for name in ("writer", "reader", "idle"))
    for member in (reader, idle):
        member.ok(RECEIVED)
    assert writer.ok(f"node.put('big', bytes(range(256)) * ({SIZE} // 256))") == 1
    for member in (reader, idle):
        settle(member, "big")
    assert received(idle) < SMALL
    assert received(reader) < SMALL
    assert reader.ok(f"v = node.get('big')\nlen(v) == {SIZE} and v[:3] == bytes([0, 1, 2])")
    fetched = received(reader)
    assert SIZE <= fetched < SIZE + SMALL
    reader.ok("node.get('big')")  # a hit: nothing more
    assert received(reader) - fetched < SMALL

    os.kill(loader.pid, signal.SIGKILL)
    loader.wait(10)
    cluster.start_loader(data=str(cluster.tmp / "data"))
    for member in (reader, idle):  # back, resynced: a request goes through
        member.ok(
            "import time\n"
            "deadline = time.monotonic() + 30\n"
            "while not node.connected and time.monotonic() < deadline: time.sleep(0.05)\n"
            "node.put(f'after-{node.name}', 1)"
        )
    late = cluster.member("late")
    late.ok(RECEIVED)
    settle(late, "big")
    time.sleep(0.5)
    for member in (reader, idle, late):
        assert received(member) < SMALL, member.name
    assert reader.ok(f"len(node.get('big')) == {SIZE}")  # still held: nothing fetched
    assert received(reader) < SMALL
    assert late.ok(f"len(node.get('big')) == {SIZE}")
    assert idle.ok(f"len(node.get('big')) == {SIZE}")


def test_a_first_get_of_a_big_bytes_value_holds_one_copy_of_it(cluster: Cluster) -> None:
    """The member receives the value straight into the bytes object it ends in (the
    receive buffer's part for it is never touched): its process grows by one copy of the
    value, not two."""
    cluster.start_loader(data=str(cluster.tmp / "data"))
    writer, reader = cluster.member("writer"), cluster.member("reader")
    writer.ok(f"node.put('big', bytes(range(256)) * ({SIZE} // 256))")
    settle(reader, "big")
    before = rss_kib(reader.proc.pid)
    assert reader.ok(
        f"v = node.get('big')\nlen(v) == {SIZE} and v == bytes(range(256)) * {SIZE // 256}"
    )
    grew = (rss_kib(reader.proc.pid) - before) * 1024
    assert SIZE <= grew < SIZE * 3 // 2, f"the first get grew the process by {grew} bytes"


def test_threads_waiting_on_a_big_values_lease_share_the_computed_object(
    cluster: Cluster,
) -> None:
    """A thread whose get waited on another thread's lease gets the object that thread
    installed, not a copy of its own."""
    cluster.start_loader(data=str(cluster.tmp / "data"))
    member = cluster.member("m")
    assert member.ok(
        "import threading, time\n"
        "got = {}\n"
        f"def slow():\n    time.sleep(0.5)\n    return bytes(range(256)) * ({SIZE} // 256)\n"
        "first = threading.Thread(target=lambda: got.update(a=node.get('big', slow)))\n"
        "first.start()\n"
        "time.sleep(0.2)\n"
        "got['b'] = node.get('big', slow)\n"
        "first.join(30)\n"
        "got['a'] is got['b'] is node.get('big')"
    )


def test_a_new_version_of_a_big_value_replaces_the_fetched_one(cluster: Cluster) -> None:
    """A node that got version 1 and hears of version 2 drops 1 and gets 2 on its next read."""
    cluster.start_loader(data=str(cluster.tmp / "data"))
    writer, reader = cluster.member("writer"), cluster.member("reader")
    writer.ok("node.put('big', b'1' * 3_000_000)")
    settle(reader, "big")
    assert reader.ok("node.get('big')[:1]") == "b'1'"
    writer.ok("node.put('big', b'2' * 3_000_000)")
    reader.ok(
        "import time\n"
        "deadline = time.monotonic() + 30\n"
        "while node.version('big', 'value') < 2 and time.monotonic() < deadline: time.sleep(0.05)"
    )
    assert reader.ok("node.get('big')[:1]") == "b'2'"
    writer.ok("node.delete('big')")
    reader.ok(
        "import time\n"
        "deadline = time.monotonic() + 30\n"
        "while 'big' in node.keys() and time.monotonic() < deadline: time.sleep(0.05)"
    )
    assert reader.ok("node.keys()") == []
