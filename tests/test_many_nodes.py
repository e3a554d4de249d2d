"""Many Node objects in one process: one shared reader reads them all, a definition is
loaded once per process and installed and acknowledged by each node; the roster of names
is made when asked for; a node's receive buffer takes memory only where reads fill it."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

import clustorage
from clustorage.channel import Roster
from clustorage.messages import Members
from clustorage.replica import LoadEvent
from tests.conftest import COOKIE, Cluster

pytestmark = pytest.mark.timeout(90)

COUNT = 12


@contextlib.contextmanager
def nodes_on(cluster: Cluster, count: int = COUNT) -> Iterator[list[clustorage.Node]]:
    started: list[clustorage.Node] = []
    try:
        for i in range(count):
            started.append(clustorage.Node(f"n{i}", cluster.loader, cookie=COOKIE, timeout=10))
        yield started
    finally:
        for node in started:
            node.stop()


def readers() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "clustorage-reader"]


def wait_until(condition: object, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_nodes_of_one_process_share_one_reader_and_each_acknowledges(cluster: Cluster) -> None:
    """A define from one of twelve nodes in this process returns acknowledged by all of
    them and the loader; one reader thread read their pushes; each node installed the
    same loaded function, and heard of the others joining."""
    cluster.start_loader()
    with nodes_on(cluster) as nodes:
        assert len(readers()) == 1
        assert wait_until(lambda: all(len(node.nodes()) == COUNT + 1 for node in nodes))
        loaded: dict[str, LoadEvent] = {}
        for node in nodes:
            node.on_load(lambda event, name=node.name: loaded.__setitem__(name, event))
        definition = nodes[0].define("twice", "def twice(x):\n    return 2 * x\n")
        assert sorted(definition.installed) == sorted(["app1", *(n.name for n in nodes)])
        assert all(node.call("twice", [21]) == 42 for node in nodes)
        others = [loaded[node.name].obj for node in nodes[1:]]
        assert all(obj is others[0] for obj in others)
        assert len(readers()) == 1


def test_nodes_of_one_process_reconnect_after_the_loader_restarts(cluster: Cluster) -> None:
    """The loader is killed and started again on its address: every node of the process
    reconnects by itself and takes the next definition."""
    loader = cluster.start_loader()
    with nodes_on(cluster, 6) as nodes:
        loader.kill()
        loader.wait(10)
        assert wait_until(lambda: not any(node.connected for node in nodes))
        cluster.start_loader()
        assert wait_until(lambda: all(node.connected for node in nodes))
        definition = nodes[-1].define("again", "lambda: 'back'")
        assert len(definition.installed) == 7
        assert all(node.call("again", []) == "back" for node in nodes)


def test_a_process_of_many_nodes_holds_no_big_buffer_per_node(cluster: Cluster) -> None:
    """Each node has a 1 MiB receive buffer, but the memory of one is only taken where a read
    fills it: 40 more nodes in a member process, each of which reads a resync, a value and
    a definition, add far less than 40 MiB to the process's RSS (each added 1 MiB before)."""
    cluster.start_loader()
    member = cluster.member("many")
    member.ok("node.put('k', 1)\nnode.define('f', 'lambda: 2')\nnode.get('k')")
    process = psutil.Process(member.proc.pid)
    before = process.memory_info().rss
    nodes = "[clustorage.Node(f'n{i}') for i in range(40)]"  # loader and cookie: from the env
    assert (
        member.ok(f"nodes = {nodes}\n[(n.get('k'), n.call('f')) for n in nodes]") == [[1, 2]] * 40
    )
    grown = process.memory_info().rss - before
    assert grown < 20 << 20, f"40 nodes added {grown >> 20} MiB"
    member.ok("for n in nodes: n.stop()")


def test_the_roster_is_the_loader_then_the_others_in_order() -> None:
    """Joins and leaves merge in; nothing merges while disconnected; the loader stays first."""
    roster = Roster()
    roster.merge(Members(("x",), ()))
    assert roster.names() == ()
    roster.reset(("L", "b", "a"))
    assert roster.names() == ("L", "a", "b")
    roster.merge(Members(("c", "L"), ("a",)))
    assert roster.names() == ("L", "b", "c")
    roster.reset(())
    assert roster.names() == ()
