"""The loader's listener on its own, over real local sockets, on each loop the loader may
run on: connections to their protocols, flow control, the cap on unauthenticated
connections (oldest closed first), the refusals of a TLS listener before TLS, and running
out of file descriptors."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from clustorage import aioloop, tls
from clustorage.errors import ConfigError
from clustorage.listener import Listener, Newcomer
from tests.conftest import client_context, server_context

pytestmark = pytest.mark.timeout(30)

try:
    import uvloop  # noqa: F401

    KINDS = list(aioloop.LOOPS)
except ImportError:
    KINDS = ["asyncio"]


class Loop:
    """An event loop on a thread of its own, as the loader runs one."""

    def __init__(self, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CLUSTORAGE_LOOP", kind)
        self.loop = aioloop.new_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.listeners: list[Listener] = []

    def run(self, function: Callable[[], Any]) -> Any:
        """Run ``function()`` on the loop thread and return its result."""
        done = threading.Event()
        result: list[Any] = []
        self.loop.call_soon_threadsafe(lambda: (result.append(function()), done.set()))
        assert done.wait(5)
        return result[0]

    def listen(self, factory: Callable[[Newcomer], Any], **options: Any) -> Listener:
        options.setdefault("handshake", 5.0)
        listener: Listener = self.run(
            lambda: Listener(self.loop, "127.0.0.1", 0, factory, **options)
        )
        self.listeners.append(listener)
        return listener

    def close(self) -> None:
        for listener in self.listeners:
            self.run(listener.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture(params=KINDS)
def loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Loop]:
    running = Loop(request.param, monkeypatch)
    try:
        yield running
    finally:
        running.close()


class Recorder(asyncio.BufferedProtocol):
    """A protocol that records what happens to it; it trusts its peer if ``trusting``."""

    def __init__(self, newcomer: Newcomer, trusting: bool = False) -> None:
        self.newcomer = newcomer
        self.trusting = trusting
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray(1 << 16)
        self.received = bytearray()
        self.events: list[str] = []
        self.lost = threading.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.trusting:
            self.newcomer.trust()

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.received += self.buffer[:nbytes]

    def eof_received(self) -> None:
        self.events.append("eof")

    def connection_lost(self, exc: Exception | None) -> None:
        self.newcomer.gone()
        self.events.append("lost")
        self.lost.set()

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")


class Recorders:
    """A protocol factory that keeps every protocol it made."""

    def __init__(self, trusting: bool = False) -> None:
        self.trusting = trusting
        self.made: list[Recorder] = []

    def __call__(self, newcomer: Newcomer) -> Recorder:
        recorder = Recorder(newcomer, self.trusting)
        self.made.append(recorder)
        return recorder

    def wait(self, count: int) -> list[Recorder]:
        deadline = time.monotonic() + 5
        while sum(r.transport is not None for r in self.made) < count:
            assert time.monotonic() < deadline, "no connection_made"
            time.sleep(0.01)
        return self.made


def connect(listener: Listener) -> socket.socket:
    return socket.create_connection(listener.socket.getsockname()[:2], timeout=5)


def closed_by_peer(sock: socket.socket, within: float = 5.0) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_bytes_flow_both_ways_and_the_end_is_seen(loop: Loop) -> None:
    """A connection reaches its protocol: bytes both ways; the peer's close gives
    eof_received, then connection_lost, which takes it off probation."""
    recorders = Recorders()
    listener = loop.listen(recorders)
    with connect(listener) as peer:
        (recorder,) = recorders.wait(1)
        assert loop.run(lambda: len(listener.untrusted)) == 1
        peer.sendall(b"hello")
        wait_until(lambda: recorder.received == b"hello")
        loop.run(lambda: recorder.transport.write(b"world"))  # type: ignore[union-attr]
        assert peer.recv(5) == b"world"
    assert recorder.lost.wait(5)
    assert recorder.events == ["eof", "lost"]
    assert loop.run(lambda: len(listener.untrusted)) == 0


def test_flow_control_pauses_above_high_and_resumes_below_low(loop: Loop) -> None:
    """A peer that does not read: writes queue, pause_writing fires once past the high
    watermark; once the peer drains, resume_writing fires and everything arrives in order."""
    recorders = Recorders()
    listener = loop.listen(recorders)
    with connect(listener) as peer:
        (recorder,) = recorders.wait(1)
        transport = recorder.transport
        assert transport is not None
        chunk = bytes(range(256)) * 1024
        loop.run(lambda: transport.set_write_buffer_limits(high=256 << 10))
        loop.run(lambda: [transport.write(chunk) for _ in range(32)])
        assert "pause" in recorder.events
        assert loop.run(transport.get_write_buffer_size) > 256 << 10
        received = bytearray()
        while len(received) < 32 * len(chunk):
            received += peer.recv(1 << 20)
        assert received == chunk * 32
        wait_until(lambda: "resume" in recorder.events)
        assert recorder.events == ["pause", "resume"]
        assert loop.run(transport.get_write_buffer_size) == 0


def test_over_the_cap_the_oldest_untrusted_connection_is_closed(
    loop: Loop, caplog: pytest.LogCaptureFixture
) -> None:
    """With a cap of 2, a third connection waiting for its handshake closes the oldest one
    (with a log line); the two youngest stay open."""
    caplog.set_level(logging.WARNING, "clustorage.listener")
    recorders = Recorders()
    listener = loop.listen(recorders, max_untrusted=2)
    first = connect(listener)
    recorders.wait(1)
    second = connect(listener)
    recorders.wait(2)
    third = connect(listener)
    try:
        assert closed_by_peer(first)
        recorders.wait(3)
        assert loop.run(lambda: len(listener.untrusted)) == 2
        assert not closed_by_peer(second, 0.2)
        assert not closed_by_peer(third, 0.2)
        assert "over the cap of 2 at once (oldest first)" in caplog.text
    finally:
        for sock in (first, second, third):
            sock.close()


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "tls"])
def test_a_connection_closed_as_its_protocol_gets_it_tells_the_protocol(
    loop: Loop, secure: bool, request: pytest.FixtureRequest
) -> None:
    """The cap (or the loader stopping) closes a connection whose protocol has just had
    connection_made, before the loop has finished handing the socket over: the protocol
    still hears connection_lost, so that it leaves the cluster, and the peer sees the close.
    (uvloop closed such a transport under its protocol without a word: a member that had
    joined meanwhile stayed a member that nothing could be sent to.)"""

    class ClosedAtOnce(Recorder):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.newcomer.close()

    made: list[Recorder] = []
    certs: Path | None = request.getfixturevalue("certs") if secure else None  # TLS only
    context = server_context(certs) if certs else None
    listener = loop.listen(
        lambda newcomer: made.append(ClosedAtOnce(newcomer)) or made[-1], context=context
    )
    with connect(listener) as plain:
        peer = (
            client_context(certs).wrap_socket(plain, server_hostname="127.0.0.1")
            if certs
            else plain
        )
        assert closed_by_peer(peer)
        wait_until(lambda: len(made) == 1)
        assert made[0].lost.wait(5), "connection_lost never came"
        assert loop.run(lambda: len(listener.untrusted)) == 0


def test_trusted_connections_do_not_count_against_the_cap(loop: Loop) -> None:
    """Connections whose protocol vouched for the peer are off probation: however many there
    are, none is closed for the cap."""
    recorders = Recorders(trusting=True)
    listener = loop.listen(recorders, max_untrusted=2)
    peers = [connect(listener) for _ in range(6)]
    try:
        recorders.wait(6)
        assert loop.run(lambda: len(listener.untrusted)) == 0
        assert not any(closed_by_peer(peer, 0.1) for peer in peers)
    finally:
        for peer in peers:
            peer.close()


def test_tls_listener_sends_an_alert_to_a_silent_peer(
    loop: Loop, caplog: pytest.LogCaptureFixture
) -> None:
    """Under TLS, a peer that sends nothing (a member without TLS waits for the loader's
    challenge) gets a TLS alert after SILENCE seconds, then the connection is closed."""
    caplog.set_level(logging.WARNING, "clustorage.listener")
    recorders = Recorders()
    listener = loop.listen(recorders, context=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    with connect(listener) as peer:
        peer.settimeout(tls.SILENCE + 5)
        assert peer.recv(100) == tls.ALERT
        assert closed_by_peer(peer)
    assert recorders.made == []
    assert "it sent nothing, as a member without TLS would" in caplog.text
    assert loop.run(lambda: len(listener.untrusted)) == 0


def test_tls_listener_refuses_a_peer_that_does_not_start_tls(
    loop: Loop, caplog: pytest.LogCaptureFixture
) -> None:
    """Under TLS, a first byte other than a handshake record's is refused at once, with a
    log line naming it; nothing reaches a protocol."""
    caplog.set_level(logging.WARNING, "clustorage.listener")
    recorders = Recorders()
    listener = loop.listen(recorders, context=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    with connect(listener) as peer:
        peer.sendall(b"CLST")
        assert closed_by_peer(peer, 2)
    assert recorders.made == []
    assert "not TLS (first byte 0x43); this loader speaks TLS only" in caplog.text
    assert loop.run(lambda: len(listener.untrusted)) == 0


def test_tls_handshake_that_stalls_is_closed_at_the_deadline(
    loop: Loop, caplog: pytest.LogCaptureFixture
) -> None:
    """A TLS handshake that starts and stalls is closed once the handshake's deadline, counted
    from the accept, has passed."""
    caplog.set_level(logging.WARNING, "clustorage.listener")
    recorders = Recorders()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    listener = loop.listen(recorders, context=context, handshake=0.5)
    with connect(listener) as peer:
        peer.sendall(b"\x16\x03\x01")  # the start of a ClientHello, and no more
        assert closed_by_peer(peer)
    wait_until(lambda: "no handshake within 0.5s" in caplog.text)
    wait_until(lambda: loop.run(lambda: len(listener.untrusted)) == 0)


def test_running_out_of_file_descriptors_pauses_accepting(tmp_path: Path) -> None:
    """With no file descriptor left, the loader logs once a second instead of spinning, and
    accepts again once descriptors are free."""
    script = tmp_path / "emfile.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, resource, socket, time
            import clustorage
            node = clustorage.Node("l", cookie="c" * 32, listen="127.0.0.1:0", data=":memory:")
            port = node.address[1]
            time.sleep(0.2)
            used = len(os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (used + 4, 4096))
            clients = []
            for _ in range(12):
                try:
                    clients.append(socket.create_connection(("127.0.0.1", port)))
                except OSError:
                    break
            start = time.process_time()
            time.sleep(1.5)
            print("cpu", round(time.process_time() - start, 2))
            for client in clients:
                client.close()
            resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
            time.sleep(1.5)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as late:
                print("accepted", len(late.recv(4)))
            node.stop()
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=25)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split() for line in done.stdout.splitlines())
    assert float(lines["cpu"]) < 0.5
    assert lines["accepted"] == "4"
    assert done.stderr.count("cannot accept connections") <= 3


def test_the_loop_is_uvloop_unless_the_environment_says_asyncio(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """$CLUSTORAGE_LOOP chooses asyncio's own loop; unset, uvloop where it is installed; an
    unknown name is a ConfigError naming the choices."""
    monkeypatch.setenv("CLUSTORAGE_LOOP", "asyncio")
    assert aioloop.loop_kind() == "asyncio"
    monkeypatch.delenv("CLUSTORAGE_LOOP")
    assert aioloop.loop_kind() == KINDS[0]
    monkeypatch.setenv("CLUSTORAGE_LOOP", "epoll")
    with pytest.raises(ConfigError, match="choose one of uvloop, asyncio"):
        aioloop.loop_kind()
