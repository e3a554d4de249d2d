"""Big values: streamed as bulk frames, forwarded without re-hashing, installed everywhere.

An in-process loader and in-process members on 127.0.0.1 (real sockets, real frames).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import pickle
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import clustorage
import clustorage.bulk
import clustorage.protocol
from clustorage.protocol import BULK
from clustorage.replica import LoadEvent
from tests.conftest import COOKIE, Cluster, Member, node_pair
from tests.test_hostile import authenticated, keep_alive

pytestmark = pytest.mark.timeout(60)

BIG = bytes(range(256)) * (3 * BULK // 256 + 7)  # a few bulk chunks, not a round size


def eventually(check: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait until ``check()`` holds, polling; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{check} still false after {seconds}s")
        time.sleep(0.01)


@pytest.fixture
def trio() -> Iterator[tuple[clustorage.Node, clustorage.Node, clustorage.Node]]:
    """The loader ``l``, member ``m`` and a second member ``o``."""
    with (
        node_pair() as (loader, member),
        clustorage.Node("o", member.loader_address, cookie=COOKIE) as other,
    ):
        yield loader, member, other


def installed(node: clustorage.Node, key: str) -> threading.Event:
    """An event set once ``node`` installs a value under ``key``."""
    done = threading.Event()

    def listener(event: LoadEvent) -> None:
        if event.key == key and not event.removed:
            done.set()

    node.on_load(listener)
    return done


def test_a_big_value_reaches_every_node_intact(trio: tuple[clustorage.Node, ...]) -> None:
    """A value over the bulk size put on one member arrives whole on the other and the loader."""
    loader, member, other = trio
    arrived = installed(other, "big")
    version = member.put("big", BIG)
    assert arrived.wait(10)
    assert other.get("big") == BIG
    assert type(other.get("big")) is bytes
    eventually(lambda: loader.keys() == ["big"])
    assert loader.get("big") == BIG
    assert loader.history("big", kind="value")[-1].version == version


def test_a_big_value_computed_by_get_is_shared(trio: tuple[clustorage.Node, ...]) -> None:
    """get's fn returning a big value: the value is committed and hot-loaded like any other."""
    _, member, other = trio
    arrived = installed(other, "computed")
    assert member.get("computed", lambda: BIG) == BIG
    assert arrived.wait(10)
    assert other.get("computed", lambda: pytest.fail("computed twice")) == BIG


def test_the_loaders_node_keeps_the_order_of_big_and_small_changes(
    trio: tuple[clustorage.Node, ...], caplog: pytest.LogCaptureFixture
) -> None:
    """Big values the loader's own node installs late still apply in order with later changes;
    the other member gets them in order too, on the same connection."""
    caplog.set_level(logging.WARNING, logger="clustorage")
    loader, member, other = trio
    member.put("k", BIG)
    member.put("k", "small")
    member.put("gone", BIG)
    member.delete("gone")
    eventually(lambda: loader.keys() == ["k"] and loader.get("k") == "small")
    # The other member takes its pushes on its own time: the big value first, then the small.
    eventually(lambda: other.get("k") == "small" and other.keys() == ["k"])
    assert [record.getMessage() for record in caplog.records] == []  # nobody reconnected


def test_big_values_in_both_directions_between_members(trio: tuple[clustorage.Node, ...]) -> None:
    """Two members put big values at once; each ends up with both."""
    _, member, other = trio
    payloads = {"from_m": BIG + b"m", "from_o": BIG + b"o"}
    threads = [
        threading.Thread(target=member.put, args=("from_m", payloads["from_m"])),
        threading.Thread(target=other.put, args=("from_o", payloads["from_o"])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    for node in (member, other):
        eventually(lambda node=node: set(payloads) <= set(node.keys()))  # type: ignore[misc]
        assert {key: node.get(key) for key in payloads} == payloads


def test_a_late_joiner_gets_big_values_in_its_resync(
    trio: tuple[clustorage.Node, ...],
) -> None:
    """A node that connects after a big value was stored receives it with its resync."""
    _, member, _ = trio
    member.put("early", BIG)
    with clustorage.Node("late", member.loader_address, cookie=COOKIE) as late:
        assert late.get("early") == BIG


def test_a_late_joiner_gets_more_than_one_frame_can_hold() -> None:
    """Values that together exceed the frame limit reach a node that joins later: the
    resync is not one frame (it used to be, and such a node could never join)."""
    limit = 4 * BULK
    values = {f"v{i}": bytes([i]) * (3 * BULK) for i in range(4)}
    with node_pair(max_frame=limit) as (_, member):
        small = {f"s{i}": i for i in range(50)}
        for key, value in {**values, **small}.items():
            member.put(key, value)
        address = member.loader_address
        with clustorage.Node("late", address, cookie=COOKIE, max_frame=limit) as late:
            assert late.keys() == sorted([*values, *small])
            assert {key: late.get(key) for key in values} == values
            assert {key: late.get(key) for key in small} == small
            assert late.version("v3") == member.version("v3")


def test_a_resync_of_big_values_does_not_count_against_the_write_limit() -> None:
    """A node joining a loader that holds more than its per-member write limit, in big values
    and in many small ones, gets every value and stays connected: the loader sends what it
    holds anyway, once, as the node drains it."""
    size = 8 << 20  # more than the socket buffers take at once
    values: dict[str, bytes] = {f"k{i}": bytes([i]) * size for i in range(5)}
    values.update({f"s{i}": bytes([i % 256]) * (BULK - 100) for i in range(400)})
    with node_pair() as (loader, member):
        loader._channel.timing.write_limit = 2 * size
        for key, value in values.items():
            member.put(key, value)
        with clustorage.Node("late", member.loader_address, cookie=COOKIE) as late:
            assert {key: late.get(key) for key in values} == values
            member.put("after", b"small")
            eventually(lambda: late.keys() == sorted([*values, "after"]))
            assert "late" in loader.nodes()


def test_the_loaders_node_reads_a_recorded_value_from_an_on_load_listener(
    trio: tuple[clustorage.Node, ...],
) -> None:
    """A value the loader's node only recorded is read in place, even from a listener on the
    loader's event-loop thread, where a request to the loader could not be made."""
    loader, member, _ = trio
    member.put("config", {"a": 1})
    eventually(lambda: loader.keys() == ["config"])
    seen: list[object] = []

    def listener(event: LoadEvent) -> None:
        if event.key == "trigger":
            seen.append(loader.get("config"))

    loader.on_load(listener)
    member.put("trigger", 1)
    eventually(lambda: seen == [{"a": 1}])


def test_the_loaders_own_writes_win_over_earlier_big_changes(
    trio: tuple[clustorage.Node, ...],
) -> None:
    """A member's big value and its deletion, then the loader's node writing the same key:
    the loader's node ends with its own value, like everyone else."""
    loader, member, other = trio
    member.put("k", BIG)
    member.delete("k")
    version = loader.put("k", "new")
    time.sleep(0.2)
    assert loader.keys() == ["k"]
    assert loader.get("k") == "new"
    eventually(lambda: other.keys() == ["k"] and other.get("k") == "new")
    assert loader.history("k", kind="value")[-1].version == version


def test_a_slow_member_behind_big_frames_is_dropped_at_the_write_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Frames queued behind a big frame count toward the loader's per-member write limit: a
    member that reads a little, steadily, but far less than it is sent, is dropped once
    what waits for it, past what the stream and the kernel buffer, passes the limit."""
    with node_pair() as (loader, member):
        loader._channel.timing.write_limit = 4 * len(BIG)
        sock, conn = authenticated(loader.address[1], "slow")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
        stop = threading.Event()
        reader = keep_alive(sock, conn, stop, 0.1, read=16 << 10)
        try:
            with caplog.at_level(logging.WARNING, logger="clustorage.server"):
                for i in range(100):
                    member.put(f"k{i}", BIG + bytes([i]))
                eventually(lambda: "(slow): it stopped reading" in caplog.text)
            eventually(lambda: "slow" not in loader.nodes())
            assert member.get("k99") == BIG + bytes([99])
        finally:
            stop.set()
            reader.join(5)
            sock.close()


def test_a_put_the_loaders_node_gave_up_on_stores_what_was_put() -> None:
    """The loader's node hands a big put to its loop; if the caller times out and reuses
    its buffer, the loop still stores what was put, not the buffer's later contents."""
    with clustorage.Node("l", cookie=COOKIE, listen="127.0.0.1:0", data=":memory:") as loader:
        loader.timeout = 0.2
        released = threading.Event()
        loader._channel.loop.call_soon_threadsafe(released.wait, 10)  # the loop is busy
        memory = bytearray(b"A" * (2 * BULK))
        value = pickle.PickleBuffer(memoryview(memory).toreadonly())  # read-only, not frozen
        with pytest.raises(clustorage.LoaderUnavailable):
            loader.put("k", value)
        memory[:] = b"B" * len(memory)
        released.set()
        with clustorage.Node("m", loader.loader_address, cookie=COOKIE) as member:
            assert member.get("k") == b"A" * (2 * BULK)


def test_the_loader_ends_the_hashing_of_a_member_that_left_mid_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A member that leaves halfway through a big frame leaves no hashing thread (nor its
    half-filled buffer) behind on the loader, whose next big frames are hashed as fast."""
    monkeypatch.setattr(clustorage.bulk, "THREAD_HASH_AT", BULK)

    def hashing() -> int:
        return sum(thread.name == "clustorage-hash" for thread in threading.enumerate())

    with node_pair() as (loader, member):
        for name in ("gone1", "gone2"):
            sock, conn = authenticated(loader.address[1], name)
            parts = b"".join(bytes(part) for part in conn.send_bulk(b"env", b"g" * (8 * BULK)))
            sock.sendall(parts[: len(parts) // 2])
            eventually(lambda: hashing() >= 1)
            sock.close()
            eventually(lambda: hashing() == 0)
        member.put("after", BIG)
        assert loader.get("after") == BIG


class Sleeper:
    """A value that takes its time to unpickle, as a big one does."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self) -> tuple[Callable[[float], None], tuple[float]]:
        return (time.sleep, (self.seconds,))


def test_changes_made_while_a_node_resyncs_win_over_its_resync() -> None:
    """A value replaced and a key deleted while a joining node is still taking in its resync
    end replaced and deleted there too: the resync is applied in its place in the stream."""
    with node_pair() as (_, member):
        member.put("slow", (Sleeper(0.8), b"s" * (2 << 20)))  # a SyncEntry of its own
        member.put("big", bytes(16 << 20))  # the SyncReply waits behind it
        member.put("k", "v1")
        member.put("d", "deleted soon")
        joined: dict[str, clustorage.Node] = {}

        def join() -> None:
            joined["late"] = clustorage.Node("late", member.loader_address, cookie=COOKIE)

        joiner = threading.Thread(target=join)
        joiner.start()
        time.sleep(0.4)  # the late node is unpickling "slow", its resync not all in
        member.put("k", "v2")
        member.delete("d")
        joiner.join(20)
        late = joined["late"]
        try:
            eventually(lambda: late.get("k") == "v2" and "d" not in set(late.keys()))
            time.sleep(0.3)
            assert late.get("k") == "v2"
            assert sorted(late.keys()) == sorted(member.keys())
        finally:
            late.stop()


def test_a_function_with_a_big_source_reaches_every_node() -> None:
    """A function whose source is over BULK bytes (too big for a bulk frame's envelope)
    reaches the connected nodes and a node that joins later."""
    text = "x" * (2 * BULK)
    source = f"def big():\n    return {text!r}\n"
    with (
        node_pair() as (_, member),
        clustorage.Node("other", member.loader_address, cookie=COOKIE) as other,
    ):
        member.define("big", source)
        eventually(lambda: "big" in other.functions())
        assert other.call("big") == text
        with clustorage.Node("late", member.loader_address, cookie=COOKIE) as late:
            assert late.call("big") == text


def test_a_definition_too_big_to_send_is_refused_and_the_cluster_goes_on() -> None:
    """A function whose source and compiled form fit one frame apart but not together is
    refused with ValueTooLarge before it is stored: connected and later nodes go on."""
    limit = 1 << 20
    source = f"def huge():\n    return {'h' * 600_000!r}\n"
    with node_pair(max_frame=limit) as (loader, member):
        with pytest.raises(clustorage.ValueTooLarge, match="frame limit"):
            member.define("huge", source)
        assert "huge" not in loader.functions()
        member.put("after", 1)
        with clustorage.Node("late", member.loader_address, cookie=COOKIE) as late:
            assert late.get("after") == 1
            assert "huge" not in late.functions()


class NeedsAModuleNobodyHas:
    """A value that only a node with a module this machine lacks could load."""

    def __reduce__(self) -> tuple[Callable[[str], object], tuple[str]]:
        return (importlib.import_module, ("clustorage_test_no_such_module",))


def test_a_value_a_node_cannot_load_breaks_nothing_there() -> None:
    """A hot-loaded value that cannot be unpickled on a node (a module it lacks) is recorded
    there: reading it raises, naming the key; the node goes on taking changes, and a node
    that joins later connects."""
    with (
        node_pair() as (_, member),
        clustorage.Node("other", member.loader_address, cookie=COOKIE) as other,
    ):
        member.put("unloadable", NeedsAModuleNobodyHas())
        member.put("after", 1)
        eventually(lambda: "after" in set(other.keys()))
        assert other.get("after") == 1
        assert "unloadable" in set(other.keys())
        with pytest.raises(ModuleNotFoundError) as raised:
            other.get("unloadable")
        assert "'unloadable'" in "".join(raised.value.__notes__)
        member.put("later", 2)
        eventually(lambda: "later" in set(other.keys()))
        with clustorage.Node("late", member.loader_address, cookie=COOKIE) as late:
            assert late.get("later") == 2
            with pytest.raises(ModuleNotFoundError):
                late.get("unloadable")


class Interrupted(Exception):
    """What the test's signal handler raises, as Ctrl-C raises KeyboardInterrupt."""


def test_a_put_interrupted_while_sending_leaves_the_node_working() -> None:
    """A put interrupted halfway through sending its frame (Ctrl-C) leaves half a frame on
    the wire: the node reconnects at once, and its next request is answered."""

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with node_pair() as (loader, member):
            timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1))
            timer.start()
            with contextlib.suppress(Interrupted):  # unless the put was done first
                member.put("big", bytes(400 << 20))
            timer.join()
            member.put("small", 1)
            assert loader.get("small") == 1
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_definition_over_the_frame_limit_is_refused_without_dropping_the_connection() -> None:
    """A define whose source alone is over this node's frame limit is refused with
    ValueTooLarge before anything is sent; the node stays connected and answers."""
    source = f"def huge():\n    return {'h' * 100_000!r}\n"
    with (
        node_pair() as (_, member),
        clustorage.Node("small", member.loader_address, cookie=COOKIE, max_frame=1 << 16) as small,
    ):
        assert small.put("before", 1) == 1
        lost: list[bool] = []
        small.on_change(lambda: lost.append(not small.connected))
        with pytest.raises(clustorage.ValueTooLarge, match="CLUSTORAGE_MAX_FRAME"):
            small.define("huge", source)
        assert small.put("after", 2) == 1
        assert not any(lost)


@pytest.mark.parametrize("without", ["member", "loader"])
def test_a_node_without_blake3_exchanges_big_values_with_nodes_that_have_it(
    cluster: Cluster, tmp_path: Path, without: str
) -> None:
    """A node without the blake3 package (PyPy, or a platform without a wheel) sends and
    receives big values all the same: a connection uses a digest both ends have, and the
    loader hashes a value again for a connection that uses another one."""
    if "blake3" not in clustorage.protocol.BULK_DIGESTS:
        pytest.skip("the blake3 package is not installed here")
    left_out = tmp_path / "without-blake3"
    left_out.mkdir()
    (left_out / "blake3.py").write_text('raise ImportError("left out for this test")\n')
    path = os.pathsep.join(filter(None, (str(left_out), cluster.env.get("PYTHONPATH"))))
    plain_env = dict(cluster.env, PYTHONPATH=path)
    if without == "loader":
        cluster.env, fast_env = plain_env, cluster.env
        cluster.start_loader()
        cluster.env = fast_env
    else:
        cluster.start_loader()
    plain = Member(
        plain_env if without == "member" else cluster.env,
        "plain",
        cluster.loader,
        log=cluster.log_of("plain"),
    )
    cluster.procs.append(plain.proc)
    fast = cluster.member("fast")
    assert plain.ok("'blake3' in clustorage.protocol.BULK_DIGESTS") is (without != "member")
    assert fast.ok("'blake3' in clustorage.protocol.BULK_DIGESTS") is True
    # Over THREAD_HASH_AT, so that receivers hash on a thread of their own too.
    value = "bytes(range(256)) * 20483"
    digest = "__import__('hashlib').sha256(node.get({!r})).hexdigest()"
    expected = hashlib.sha256(bytes(range(256)) * 20483).hexdigest()
    for writer, reader, key in ((plain, fast, "from-plain"), (fast, plain, "from-fast")):
        writer.ok(f"node.put({key!r}, {value})")
        assert reader.ok(digest.format(key)) == expected
