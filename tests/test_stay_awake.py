"""The loader's loop polls for a moment after a request instead of sleeping at once
(clustorage.stay_awake), and only after a request: not after a heartbeat or an ack."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from clustorage import messages
from clustorage.hello import Timing
from clustorage.listener import Listener, Newcomer
from clustorage.loader import LoaderCore
from clustorage.poll_windows import LATE
from clustorage.protocol import Connection, Frame, State
from clustorage.server import ServerConnection
from clustorage.stay_awake import StayAwake
from clustorage.store import MemoryStore
from tests.conftest import node_pair
from tests.loop_helpers import LoopThread, honest_handshake
from tests.protocol_helpers import COOKIE

pytestmark = pytest.mark.timeout(60)


class Clock:
    """The time a polling thread reads, moved only by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Yields:
    """The polling thread's yields, counted; each moves ``clock`` on by ``takes`` seconds
    (a yield that waited for the GIL or a CPU takes long)."""

    def __init__(self, clock: Clock, takes: float = 0.0) -> None:
        self.clock = clock
        self.takes = takes
        self.count = 0
        self.several = threading.Event()  # three or more

    def __call__(self) -> None:
        self.count += 1
        self.clock.now += self.takes
        if self.count >= 3:
            self.several.set()


class CountingStayAwake(StayAwake):
    """A real StayAwake that counts the requests it was told of."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests = 0

    def requested(self) -> None:
        self.requests += 1
        super().requested()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    running = LoopThread()
    yield running
    running.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def yields(clock: Clock) -> Yields:
    return Yields(clock)


def _polling_ended(loop_thread: LoopThread, awake: StayAwake) -> None:
    ended = threading.Event()

    def check() -> None:
        if awake.polling:
            loop_thread.loop.call_later(0.001, check)
        else:
            ended.set()

    loop_thread.loop.call_soon_threadsafe(check)
    assert ended.wait(20), "the loop kept polling"


POLL = LATE / 2  # a window's length in these tests: its end is not a late turn


def test_a_request_keeps_the_loop_polling_then_it_sleeps(
    loop_thread: LoopThread, clock: Clock, yields: Yields
) -> None:
    awake = StayAwake(loop_thread.loop, POLL, clock, yields)
    loop_thread.on_loop(awake.requested)
    assert yields.several.wait(20)  # turn after turn of the loop, each polling its sockets
    assert awake.polling is True
    clock.now += POLL * 1.5
    _polling_ended(loop_thread, awake)
    polled = yields.count
    loop_thread.on_loop(lambda: None)  # a turn of the loop after the polling ended
    assert yields.count == polled


def test_a_loop_whose_yields_take_long_stops_polling(loop_thread: LoopThread, clock: Clock) -> None:
    """Another thread holds the GIL (a notebook that is the loader, busy): each window ends
    at its first turn, and after two the loop sleeps at once."""
    yields = Yields(clock, takes=LATE * 2)
    awake = StayAwake(loop_thread.loop, 1.0, clock, yields)
    for _ in range(2):
        loop_thread.on_loop(awake.requested)
        _polling_ended(loop_thread, awake)
    assert yields.count == 2
    loop_thread.on_loop(awake.requested)
    assert awake.polling is False
    loop_thread.on_loop(lambda: None)
    assert yields.count == 2


def test_no_polling_when_told_not_to(loop_thread: LoopThread, clock: Clock, yields: Yields) -> None:
    awake = StayAwake(loop_thread.loop, 0.0, clock, yields)
    loop_thread.on_loop(awake.requested)
    loop_thread.on_loop(lambda: None)
    assert awake.polling is False
    assert yields.count == 0


def _answer(sock: socket.socket, client: Connection) -> messages.Message:
    while True:
        event = client.next_event()
        if isinstance(event, Frame) and event.payload:
            message = messages.decode(event.payload)
            if getattr(message, "rid", None) is not None:
                return message
            continue
        if event is None:
            data = sock.recv(65536)
            assert data, "the loader closed the connection"
            client.receive_data(data)


def test_only_a_request_keeps_the_loaders_loop_awake(loop_thread: LoopThread) -> None:
    """Bytes in over a real socket: a heartbeat, an acknowledgement and a notice leave the
    loop free to sleep; a request (here a Fetch) makes it poll."""
    loop = loop_thread.loop
    awake = CountingStayAwake(loop, poll_for=0.001)
    core = LoaderCore("app1", MemoryStore(), loop.call_later)
    registry: set[Any] = set()

    def connection(newcomer: Newcomer) -> ServerConnection:
        return ServerConnection(core, COOKIE, Timing(), 1 << 20, registry, newcomer, awake)

    server: Listener = loop_thread.on_loop(
        lambda: Listener(loop, "127.0.0.1", 0, connection, handshake=10.0)
    )
    try:
        port = int(server.socket.getsockname()[1])
        sock, client = honest_handshake(port, "m1")
        assert client.state is State.OPEN
        with sock:
            sock.sendall(client.heartbeat())
            sock.sendall(client.send(messages.encode(messages.Loaded("value", "k", 1))))
            release = messages.Release(0, "k", "a notice: rid 0 asks for no answer")
            sock.sendall(client.send(messages.encode(release)))
            sock.sendall(client.send(messages.encode(messages.Fetch(7, "value", "k", False))))
            answer = _answer(sock, client)
            assert getattr(answer, "rid", None) == 7
            assert loop_thread.on_loop(lambda: awake.requests) == 1
    finally:
        loop_thread.on_loop(server.close)


def test_a_loaders_connections_tell_its_loop_of_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An in-process loader and a member: the member's requests reach the loader's
    StayAwake (counted through the class, the one the loader makes)."""
    told: list[StayAwake] = []
    real = StayAwake.requested

    def requested(self: StayAwake) -> None:
        told.append(self)
        real(self)

    monkeypatch.setattr(StayAwake, "requested", requested)
    with node_pair() as (_, member):
        assert member.get("k", lambda: 1) == 1
        assert member.get("k") == 1
    assert len(told) >= 2  # the get's lease, then its commit
    assert len(set(map(id, told))) == 1  # one per loader
