"""The process's shared reader, on real sockets: a connection whose caller reads it is
parked (not polled) until the retry it asked for, or until the caller resumes it, and a
failing connection ends its own watch, not the thread; a member's caller that keeps
reading its own answers is left alone for longer and longer."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import clustorage
from clustorage import member
from clustorage.member import STAY_AWAY, MemberClient
from clustorage.messages import VALUE
from clustorage.readers import TICK, SharedReader
from tests.conftest import COOKIE, Cluster
from tests.test_promises import wait_until

pytestmark = pytest.mark.timeout(90)

LATER = TICK / 5  # what a member asks for when its caller has been reading a while


class Busy:
    """A connection whose caller holds it while ``busy`` is set: the reader is told to come
    back later, as a member does while a caller reads its own answer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.busy = True
        self.calls = 0
        self.received = b""
        self.got = threading.Event()
        self.error: BaseException | None = None

    def readable(self, retry: bool) -> float | None:
        self.calls += 1
        if self.busy:
            return LATER
        self.received += self.sock.recv(100)
        self.got.set()
        return None

    def ended(self, error: BaseException) -> None:
        self.error = error

    def due(self, now: float) -> bool:
        return False


@pytest.fixture
def reader() -> Iterator[SharedReader]:
    """A reader of its own (the process's stays as it is), ended after the test."""
    started = SharedReader()
    yield started
    started.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    here, there = socket.socketpair()
    here.setblocking(False)
    yield here, there
    here.close()
    there.close()


def test_a_held_connection_is_parked_until_its_retry_then_resumed_at_once(
    reader: SharedReader, pair: tuple[socket.socket, socket.socket]
) -> None:
    here, there = pair
    watched = Busy(here)
    fd = reader.watch(here, watched)
    there.send(b"x")  # it stays unread while the caller holds the connection
    time.sleep(3 * TICK)
    # Polled while parked, the unread byte would be reported at every turn: thousands of
    # calls. Parked until each retry: one call per LATER at most.
    assert 2 <= watched.calls <= 3 * TICK / LATER + 2, watched.calls
    watched.busy = False
    reader.resume(fd, watched)  # the caller is done: read it now, not at the next retry
    assert watched.got.wait(TICK / 2)
    assert watched.received == b"x"
    reader.forget(fd, watched)


def test_a_connection_whose_read_fails_ends_alone(
    reader: SharedReader, pair: tuple[socket.socket, socket.socket]
) -> None:
    here, there = pair
    other_here, other_there = socket.socketpair()
    other_here.setblocking(False)

    class Failing(Busy):
        def readable(self, retry: bool) -> float | None:
            raise SystemExit("a listener called sys.exit")

    failing, fine = Failing(here), Busy(other_here)
    fine.busy = False
    reader.watch(here, failing)
    reader.watch(other_here, fine)
    there.send(b"a")
    deadline = time.monotonic() + 10
    while failing.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(failing.error, SystemExit)
    other_there.send(b"b")  # the thread lives on for the others
    assert fine.got.wait(10) and fine.received == b"b"
    other_here.close()
    other_there.close()


def test_a_node_putting_in_a_loop_is_left_to_its_caller_and_read_again_after(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a node's caller puts one value after another, reading each answer itself, the
    shared reader comes back ever more rarely, up to STAY_AWAY apart (each visit that finds
    the caller at it costs both threads a switch); once the puts stop, it reads the pushes
    for that node again."""
    cluster.start_loader()
    told: list[float | None] = []
    readable = MemberClient.readable

    def recorded(self: MemberClient, sock: Any, retry: bool) -> float | None:
        delay = readable(self, sock, retry)
        if self.config.name == "writer":
            told.append(delay)
        return delay

    monkeypatch.setattr(MemberClient, "readable", recorded)
    with (
        clustorage.Node("writer", cluster.loader, cookie=COOKIE) as writer,
        clustorage.Node("other", cluster.loader, cookie=COOKIE) as other,
    ):
        writes, stop_at = 0, time.monotonic() + 1.0
        while time.monotonic() < stop_at or writes < 100:
            writer.put(f"k{writes % 8}", writes)
            writes += 1
        assert STAY_AWAY in told, f"told {sorted(set(told), key=str)} over {writes} puts"
        version = other.put("from other", 1)
        wait_until(
            lambda: writer._replica.version(VALUE, "from other") == version,
            10,
            "the push read by the shared reader",
        )


@contextlib.contextmanager
def leases_held(holder: clustorage.Node, *keys: str) -> Iterator[dict[str, threading.Event]]:
    """Node ``holder`` computes each of ``keys``, its fn waiting until the key's event is
    set (all are at the end)."""
    done = {key: threading.Event() for key in keys}
    started = {key: threading.Event() for key in keys}

    def hold(key: str) -> None:
        def fn() -> str:
            started[key].set()
            done[key].wait(60)
            return f"{key} from h"

        holder.get(key, fn)

    threads = [threading.Thread(target=hold, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    try:
        for key in keys:
            assert started[key].wait(20), f"h did not get the lease of {key}"
        yield done
    finally:
        for event in done.values():
            event.set()
        for thread in threads:
            thread.join(20)


@pytest.mark.parametrize("resumed_before_parking", [False, True])
def test_a_waiting_caller_is_read_for_once_the_caller_reading_is_done(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, resumed_before_parking: bool
) -> None:
    """Two threads of node m wait behind leases that node h holds: the first reads the
    connection (its own answer, and any other's), the second waits for someone to read
    its answer. The first's answer comes, then the second's: the shared reader, which
    stepped aside while the first read, reads for the second at once: not after the while
    it stays away from a busy node, nor only if the first read for long, nor when the next
    heartbeat or tick is due (all made a minute here, so that waiting for any would hang).
    ``resumed_before_parking``: the first is done, and resumes the reader, while the reader
    is between being told to come back later and parking the connection."""
    cluster.start_loader()
    for constant in ("LINGER", "STAY_AWAY", "RESUME_AFTER", "HEARTBEAT", "TICK"):
        monkeypatch.setattr(member, constant, 60.0)
    told_later, first_done = threading.Event(), threading.Event()
    readable, release_io = MemberClient.readable, MemberClient._release_io
    armed = False

    def held_up(self: MemberClient, sock: Any, retry: bool) -> float | None:
        nonlocal armed
        delay = readable(self, sock, retry)
        if armed and self.config.name == "m" and delay is not None and self._held_since:
            armed = False
            told_later.set()
            first_done.wait(20)
        return delay

    def releasing(self: MemberClient) -> None:
        release_io(self)
        if told_later.is_set() and self.config.name == "m":
            first_done.set()

    monkeypatch.setattr(MemberClient, "readable", held_up)
    monkeypatch.setattr(MemberClient, "_release_io", releasing)
    with (
        clustorage.Node("h", cluster.loader, cookie=COOKIE) as holder,
        clustorage.Node("m", cluster.loader, cookie=COOKIE) as node,
        leases_held(holder, "a", "b") as done,
    ):
        client = node._channel
        got: dict[str, Any] = {}

        def get(key: str) -> None:
            got[key] = node.get(key, lambda: f"{key} from m")

        node.put("warm", 1)  # a run of requests: the shared reader steps aside
        first = threading.Thread(target=get, args=("a",))
        first.start()
        wait_until(lambda: client._patient, 20, "the first caller queued, reading")
        if resumed_before_parking:  # the second's Queued wakes it, to be told to wait
            assert client._watch is not None
            reader, fd, following = client._watch
            reader.resume(fd, following)
            armed = True
        second = threading.Thread(target=get, args=("b",))
        second.start()
        wait_until(lambda: len(client.pending.queued) == 2, 20, "the second caller queued")
        if resumed_before_parking:
            assert told_later.wait(20), "the reader was not told to come back later"
        done["a"].set()
        first.join(20)
        assert got.get("a") == "a from h"
        done["b"].set()
        second.join(20)
        assert got.get("b") == "b from h", "the second caller's answer was left unread"


def test_a_waiting_caller_does_not_multiply_the_readers_retries(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a request of node m waits behind a lease, another thread of m puts in a loop:
    each of its answers resumes the shared reader (the waiting request's answer may come
    once nobody reads), which parks the connection again on the next. A parked connection
    has one retry at a time, each at least LINGER away: the reader reads m at most once per
    put and once per LINGER, not a retry more for every put."""
    cluster.start_loader()
    calls = 0
    readable = MemberClient.readable

    def counted(self: MemberClient, sock: Any, retry: bool) -> float | None:
        nonlocal calls
        if self.config.name == "m":
            calls += 1
        return readable(self, sock, retry)

    monkeypatch.setattr(MemberClient, "readable", counted)
    with (
        clustorage.Node("h", cluster.loader, cookie=COOKIE) as holder,
        clustorage.Node("m", cluster.loader, cookie=COOKIE) as node,
        leases_held(holder, "q") as done,
    ):
        client = node._channel
        with client._io_lock:  # as a caller reading would: the get waits for a reader
            waiting = threading.Thread(target=node.get, args=("q", lambda: "from m"))
            waiting.start()
            wait_until(client.pending.busy, 20, "the get waits")
        wait_until(lambda: client.pending.queued, 20, "the get queued")
        seconds = 1.0
        puts, calls, stop_at = 0, 0, time.monotonic() + seconds
        while time.monotonic() < stop_at:
            node.put(f"k{puts % 8}", puts)
            puts += 1
        reads = calls
        done["q"].set()
        waiting.join(20)
        bound = puts + seconds / member.LINGER + 100  # and a few ticks
        assert reads < bound, f"the reader read m {reads} times over {puts} puts"


def test_a_resume_while_the_reader_parks_is_not_lost(
    reader: SharedReader, pair: tuple[socket.socket, socket.socket]
) -> None:
    """A caller resumes a connection while the reader, told to come back in a minute, is
    parking it (past its check for a resume, not yet parked): the resume is not lost, and
    what arrives is read at once, not after that minute."""
    here, there = pair

    class Once(Busy):
        def readable(self, retry: bool) -> float | None:
            self.calls += 1
            if self.calls == 1:
                return 60.0  # a caller reads it: come back much later
            self.received += self.sock.recv(100)
            self.got.set()
            return None

    watched = Once(here)
    parking, go_on = threading.Event(), threading.Event()
    poller = reader._poller

    class HeldUp:
        """The reader's poller, with the reader held up inside the park's unregister."""

        def __getattr__(self, name: str) -> Any:
            return getattr(poller, name)

        def unregister(self, fd: int) -> None:
            if not go_on.is_set():
                parking.set()
                go_on.wait(10)
            poller.unregister(fd)

    reader._poller = HeldUp()
    fd = reader.watch(here, watched)
    there.send(b"x")
    assert parking.wait(10)
    resumer = threading.Thread(target=reader.resume, args=(fd, watched))
    resumer.start()
    resumer.join(0.5)  # it waits for the park to end, or it has come and gone
    go_on.set()
    resumer.join(10)
    assert watched.got.wait(10), f"the resume was lost ({watched.calls} reads)"
    assert watched.received == b"x"
    reader.forget(fd, watched)


@contextlib.contextmanager
def uploading(client: MemberClient) -> Iterator[None]:
    """A thread of ``client``'s node holds its send lock, as a long upload does, until the
    block ends (a minute at most)."""
    sending, done = threading.Event(), threading.Event()

    def upload() -> None:
        with client._send_lock:
            sending.set()
            done.wait(60)

    thread = threading.Thread(target=upload)
    thread.start()
    try:
        assert sending.wait(10)
        yield
    finally:
        done.set()
        thread.join(10)


def test_a_request_made_during_an_upload_leaves_the_connection_to_the_reader(
    cluster: Cluster,
) -> None:
    """While a thread of node m uploads (holds the send lock, here for a minute), another
    thread's request waits to be sent without taking the connection's reading: a push to
    m is read meanwhile, not after the upload."""
    cluster.start_loader()
    with (
        clustorage.Node("d", cluster.loader, cookie=COOKIE) as other,
        clustorage.Node("m", cluster.loader, cookie=COOKIE) as node,
    ):
        client = node._channel
        with uploading(client):
            asking = threading.Thread(target=node.status)
            asking.start()
            wait_until(
                lambda: client.pending.busy() or client._io_lock.locked(),
                10,
                "the request waits to be sent",
            )
            other.put("pushed", 1)
            wait_until(
                lambda: node._replica.version(VALUE, "pushed") > 0,
                10,
                "the push read during the upload",
            )
        asking.join(20)
        assert not asking.is_alive()


def test_an_upload_on_one_node_holds_up_no_other_nodes_pushes(cluster: Cluster) -> None:
    """Nodes x and y share a process, and its shared reader. While a thread of x uploads
    (holds x's send lock, here until the end), a definition comes to both and must be
    acknowledged, then a value: y gets both, for x's acknowledgement waits on a thread of
    its own, not on the reader; x's is sent once the upload is over."""
    cluster.start_loader()
    with (
        clustorage.Node("d", cluster.loader, cookie=COOKIE) as definer,
        clustorage.Node("x", cluster.loader, cookie=COOKIE) as x,
        clustorage.Node("y", cluster.loader, cookie=COOKIE) as y,
    ):
        defined: list[Any] = []
        with uploading(x._channel):
            defining = threading.Thread(
                target=lambda: defined.append(definer.define("f", "def f():\n    return 1\n"))
            )
            defining.start()
            wait_until(lambda: "f" in y.functions(), 10, "y has f during x's upload")
            definer.put("v", 1)
            wait_until(lambda: y._replica.version(VALUE, "v") > 0, 10, "y has v during x's upload")
        defining.join(30)
        assert defined, "the definition was not answered"
        assert "f" in x.functions()
