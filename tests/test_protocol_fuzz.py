"""Hostile bytes against the Connection: only protocol errors, and nothing unpickled pre-auth."""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import pickle
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import cloudpickle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clustorage.codec
import clustorage.messages
from clustorage.errors import AuthenticationError, ProtocolError
from clustorage.hello import Timing
from clustorage.listener import Listener, Newcomer
from clustorage.loader import LoaderCore
from clustorage.protocol import MAGIC, VERSION, Connection, Event, Frame, Role, State
from clustorage.server import ServerConnection
from clustorage.store import MemoryStore
from tests.loop_helpers import LoopThread, honest_handshake
from tests.protocol_helpers import CLIENT_META, COOKIE, SERVER_META, ConnectionPair

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# The exceptions a peer's bytes may cause; anything else is a bug in protocol.py.
PROTOCOL_ERRORS = (ProtocolError, AuthenticationError)

# Every door to unpickling: while a connection is not OPEN, none may be opened.
UNPICKLERS: list[tuple[Any, str]] = [
    (pickle, "loads"),
    (pickle, "load"),
    (pickle, "Unpickler"),
    (cloudpickle, "loads"),
    (cloudpickle, "load"),
    (clustorage.messages, "decode"),
    (clustorage.codec, "load"),
]


@contextmanager
def no_unpickling(what: str) -> Iterator[list[str]]:
    """Replace every unpickler with a trap; the list names each trap that was sprung."""
    sprung: list[str] = []

    def trap(name: str) -> Callable[..., Any]:
        def sprung_trap(*args: object, **kwargs: object) -> Any:
            sprung.append(name)
            raise AssertionError(f"{name} was called during {what}")

        return sprung_trap

    with pytest.MonkeyPatch.context() as patch:
        for module, name in UNPICKLERS:
            patch.setattr(module, name, trap(f"{module.__name__}.{name}"))
        yield sprung


def feed(conn: Connection, chunks: list[bytes], *, eof: bool) -> list[Event]:
    """Feed ``chunks`` (then EOF) and collect events until a protocol error or the end."""
    events: list[Event] = []
    try:
        for chunk in [*chunks, *([b""] if eof else [])]:
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not None:
                events.append(event)
    except PROTOCOL_ERRORS:
        assert conn.state is State.ERROR
    return events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (positions modulo its length), so reads arrive in pieces."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def test_unpickling_traps_are_sprung() -> None:
    """The traps the pre-auth fuzz relies on do catch every way in to unpickling."""
    payload = clustorage.messages.encode(clustorage.messages.Status(1))
    calls: list[Callable[[], object]] = [
        lambda: pickle.loads(payload),
        lambda: pickle.Unpickler(io.BytesIO(payload)).load(),
        lambda: cloudpickle.loads(payload),
        lambda: clustorage.messages.decode(payload),
        lambda: clustorage.codec.load(payload),
    ]
    with no_unpickling("the trap check") as sprung:
        for call in calls:
            with pytest.raises(AssertionError):
                call()
    assert len(sprung) == len(calls)
    assert clustorage.messages.decode(payload) == clustorage.messages.Status(1)


# -- before authentication ------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=4))
def test_arbitrary_bytes_to_fresh_server(data: bytes, cuts: list[int]) -> None:
    """A fresh server fed any bytes raises only protocol errors and never unpickles."""
    with no_unpickling("the server handshake") as sprung:
        server = Connection(Role.SERVER, COOKIE, SERVER_META)
        server.data_to_send()
        events = feed(server, split(data, cuts), eof=True)
    assert sprung == []
    assert events == []
    assert server.state is State.ERROR


@FUZZ
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=4))
def test_arbitrary_bytes_to_client_awaiting_challenge(data: bytes, cuts: list[int]) -> None:
    """A client fed any bytes instead of a challenge raises only protocol errors."""
    with no_unpickling("the client handshake") as sprung:
        client = Connection(Role.CLIENT, COOKIE, CLIENT_META)
        events = feed(client, split(data, cuts), eof=True)
    assert sprung == []
    assert events == []
    assert client.state is State.ERROR


CHALLENGE_HEAD = MAGIC + VERSION.to_bytes(2, "big")


@FUZZ
@given(nonce=st.binary(min_size=32, max_size=32), rest=st.binary(max_size=600))
def test_arbitrary_welcome_after_valid_challenge(nonce: bytes, rest: bytes) -> None:
    """A well-formed challenge followed by any bytes never gets the client to OPEN."""
    with no_unpickling("the client handshake") as sprung:
        client = Connection(Role.CLIENT, COOKIE, CLIENT_META)
        events = feed(client, [CHALLENGE_HEAD + nonce, rest], eof=True)
    assert sprung == []
    assert events == []
    assert client.state is State.ERROR


@FUZZ
@given(
    kind=st.sampled_from([b"W", b"R"]),
    body=st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 300), max_size=3),
)
def test_arbitrary_welcome_body(kind: bytes, body: bytes, cuts: list[int]) -> None:
    """WELCOME- or REJECT-shaped garbage after a real challenge raises only protocol errors."""
    pair = ConnectionPair()
    with no_unpickling("the client handshake") as sprung:
        pair.start()
        events = feed(pair.client, split(kind + body, cuts), eof=True)
    assert sprung == []
    assert events == []


# -- a recorded session, mutated -------------------------------------------------------------

PAYLOADS = [b"hello", b"", b"x" * 300, bytes(range(256)), b"", b"last"]


def _recorded() -> tuple[Connection, list[bytes]]:
    """A server just OPEN (to copy) and the client frames that followed it."""
    pair = ConnectionPair(max_frame=4096)
    pair.open()
    return copy.deepcopy(pair.server), [pair.client.send(p) for p in PAYLOADS]


OPEN_SERVER, FRAMES = _recorded()
SESSION = b"".join(FRAMES)


def delivered(events: list[Event]) -> list[bytes]:
    """The payloads of the Frame events; asserts no other event but a final Closed."""
    frames = [e for e in events if isinstance(e, Frame)]
    assert len(events) - len(frames) <= 1
    return [f.payload for f in frames]


def test_recorded_session_replays_into_a_copy() -> None:
    """The unmutated recording delivers every payload, then Closed (the fuzz baseline)."""
    server = copy.deepcopy(OPEN_SERVER)
    events = feed(server, [SESSION], eof=True)
    assert delivered(events) == PAYLOADS
    assert server.state is State.CLOSED


@st.composite
def mutated_session(draw: st.DrawFn) -> bytes:
    """The recorded frames with bit flips, truncations, insertions and duplications."""
    frames = list(FRAMES)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "duplicate", "drop", "swap"]))
        i = draw(st.integers(0, len(frames) - 1))
        frame = frames[i]
        if op == "flip" and frame:
            at = draw(st.integers(0, len(frame) - 1))
            bit = 1 << draw(st.integers(0, 7))
            frames[i] = frame[:at] + bytes([frame[at] ^ bit]) + frame[at + 1 :]
        elif op == "truncate":
            frames[i] = frame[: draw(st.integers(0, max(len(frame) - 1, 0)))]
        elif op == "insert":
            at = draw(st.integers(0, len(frame)))
            frames[i] = frame[:at] + draw(st.binary(min_size=1, max_size=16)) + frame[at:]
        elif op == "duplicate":
            frames.insert(i, frame)
        elif op == "drop" and len(frames) > 1:
            del frames[i]
        elif op == "swap":
            j = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
    return b"".join(frames)


@FUZZ
@given(data=mutated_session(), cuts=st.lists(st.integers(0, 2000), max_size=4))
def test_mutated_session_to_open_server(data: bytes, cuts: list[int]) -> None:
    """A mutated session raises only protocol errors and delivers only a prefix of the original."""
    server = copy.deepcopy(OPEN_SERVER)
    with no_unpickling("framing") as sprung:
        events = feed(server, split(data, cuts), eof=True)
    assert sprung == []
    got = delivered(events)
    assert got == PAYLOADS[: len(got)]


@FUZZ
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=4))
def test_arbitrary_bytes_to_open_server(data: bytes, cuts: list[int]) -> None:
    """Random bytes to an OPEN server never yield a Frame."""
    server = copy.deepcopy(OPEN_SERVER)
    events = feed(server, split(data, cuts), eof=True)
    assert delivered(events) == []


# -- the loader's handshake deadline and cap, against a real server on 127.0.0.1 -----------

CAP = 4
DEADLINE = 0.3
TRICKLE = MAGIC + VERSION.to_bytes(2, "big") + bytes(200)  # a response that never ends


class _LoaderOnLoop(LoopThread):
    """A loader's server (core, connections, listener) on a loop thread of its own, as in a
    loader process, with a small cap on unauthenticated connections and a short deadline."""

    def __init__(self) -> None:
        super().__init__()
        core = LoaderCore("app1", MemoryStore(), self.loop.call_later)
        timing = Timing(handshake=DEADLINE)
        registry: set[Any] = set()

        def connection(newcomer: Newcomer) -> ServerConnection:
            return ServerConnection(core, COOKIE, timing, 1 << 20, registry, newcomer)

        self.server: Listener = self.on_loop(
            lambda: Listener(
                self.loop, "127.0.0.1", 0, connection, handshake=DEADLINE, max_untrusted=CAP
            )
        )
        self.port = int(self.server.socket.getsockname()[1])
        self.honest = itertools.count()

    def untrusted(self) -> int:
        return int(self.on_loop(lambda: len(self.server.untrusted)))

    def handshake(self) -> State:
        """An honest member's handshake; the state it ends in."""
        sock, client = honest_handshake(self.port, f"honest{next(self.honest)}")
        sock.close()
        return client.state

    def close(self) -> None:
        self.on_loop(self.server.close)
        super().close()


@pytest.fixture(scope="module")
def loader_on_loop() -> Iterator[_LoaderOnLoop]:
    """One loader server for the whole module's examples."""
    loader = _LoaderOnLoop()
    yield loader
    loader.close()


def _open(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex(("127.0.0.1", port))
    return sock


def _trickle(sock: socket.socket, sent: int) -> int | None:
    """Send the next byte of a never-ending response; None once the loader closed ``sock``."""
    try:
        with contextlib.suppress(BlockingIOError):
            if sock.recv(65536) == b"":
                return None
        return sent + sock.send(TRICKLE[sent % len(TRICKLE) :][:1])
    except BlockingIOError:
        return sent
    except OSError:
        return None


def _trickle_all(socks: list[tuple[socket.socket, int]]) -> list[tuple[socket.socket, int]]:
    """A byte more on each socket; those the loader closed are closed and left out."""
    left = []
    for sock, sent in socks:
        now = _trickle(sock, sent)
        if now is None:
            sock.close()
        else:
            left.append((sock, now))
    return left


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(plan=st.lists(st.sampled_from(["open", "trickle", "close", "honest"]), max_size=30))
@pytest.mark.timeout(300)
def test_handshake_deadline_and_cap(loader_on_loop: _LoaderOnLoop, plan: list[str]) -> None:
    """Whatever mix of trickling connections, closes and honest members: never more than
    the cap wait unauthenticated, every honest member gets in, and every trickling
    connection is closed (the deadline is absolute, however often bytes arrive)."""
    loader = loader_on_loop
    trickling: list[tuple[socket.socket, int]] = []
    try:
        for step in plan:
            if step == "open":
                trickling.append((_open(loader.port), 0))
            elif step == "trickle":
                trickling = _trickle_all(trickling)
            elif step == "close" and trickling:
                trickling.pop(0)[0].close()
            elif step == "honest":
                assert loader.handshake() is State.OPEN
            assert loader.untrusted() <= CAP
        for _ in range(60):  # 3 s of a byte per socket every 50 ms: ten times the deadline
            trickling = _trickle_all(trickling)
            if not trickling:
                break
            time.sleep(0.05)
        assert trickling == [], "a trickling connection outlived the handshake deadline"
    finally:
        for sock, _ in trickling:
            sock.close()
