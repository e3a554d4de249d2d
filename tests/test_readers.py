"""The process's shared reader, on real sockets: a connection whose caller reads it is
parked (not polled) until the retry it asked for, or until the caller resumes it, a
failing connection ends its own watch, not the thread, and after a read the thread polls
for a moment before it sleeps again."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from clustorage.poll_windows import LATE, POLL_FOR
from clustorage.readers import TICK, SharedReader
from tests.poll_helpers import Clock, Yields

pytestmark = pytest.mark.timeout(30)

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


def _polling_ended(reader: SharedReader) -> None:
    deadline = time.perf_counter() + 10
    while reader.polling and time.perf_counter() < deadline:
        time.sleep(0.001)
    assert reader.polling is False


def _send_and_read(there: socket.socket, watched: Busy) -> None:
    watched.got.clear()
    there.send(b"x")
    assert watched.got.wait(10)


def test_after_a_read_the_reader_polls_for_a_moment_then_sleeps(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The frames of a push to many nodes of a process come one after another: after a
    read the reader polls, yielding the CPU at each turn, instead of sleeping at once; once
    the window ends, it sleeps."""
    clock = Clock()
    yields = Yields(clock)
    reader = SharedReader(clock, yields)
    try:
        here, there = pair
        watched = Busy(here)
        watched.busy = False
        fd = reader.watch(here, watched)
        _send_and_read(there, watched)
        assert yields.several.wait(10)  # the window stays open while the clock stands still
        assert reader.polling is True
        clock.now += POLL_FOR * 1.5  # the window's end
        _polling_ended(reader)
        polled = yields.count
        time.sleep(0.05)  # the reader sleeps in its poll now: no more turns
        assert yields.count == polled
        reader.forget(fd, watched)
    finally:
        reader.close()


class SendingYields(Yields):
    """Yields that take long, while a byte arrives during each."""

    def __init__(self, clock: Clock, there: socket.socket) -> None:
        super().__init__(clock, takes=LATE * 2)
        self.there = there

    def __call__(self) -> None:
        super().__call__()
        self.there.send(b"y")


def test_a_reader_polls_through_slow_yields_while_reads_come(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Unlike the loader's loop, a reader keeps its window while reads keep coming, however
    long its yields take: that is when every CPU is busy, a push to each node of every
    process, and when polling pays most."""
    here, there = pair
    clock = Clock()
    yields = SendingYields(clock, there)
    reader = SharedReader(clock, yields)
    try:
        watched = Busy(here)
        watched.busy = False
        fd = reader.watch(here, watched)
        _send_and_read(there, watched)
        deadline = time.perf_counter() + 10
        while yields.count < 20 and time.perf_counter() < deadline:
            time.sleep(0.001)
        assert yields.count >= 20
        reader.forget(fd, watched)
    finally:
        reader.close()


def test_a_parked_connection_opens_no_window(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Data for a connection whose caller reads it is not read here: nothing arrived for
    this thread, and it does not poll for more."""
    clock = Clock()
    yields = Yields(clock)
    reader = SharedReader(clock, yields)
    try:
        here, there = pair
        watched = Busy(here)  # busy: its caller holds it
        fd = reader.watch(here, watched)
        there.send(b"x")
        deadline = time.perf_counter() + 10
        while watched.calls == 0 and time.perf_counter() < deadline:
            time.sleep(0.001)
        assert watched.calls >= 1
        time.sleep(0.05)  # a window opened would stay open: the clock stands still
        assert reader.polling is False
        assert yields.count == 0
        reader.forget(fd, watched)
    finally:
        reader.close()
