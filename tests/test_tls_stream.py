"""The loader's TLS stream on real sockets of 127.0.0.1, on uvloop and on asyncio's loop: a
TLS client in a thread sends records the way a member (or a hostile peer) would."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from clustorage import listener, tls_stream
from tests.conftest import client_context, server_context

pytest.importorskip("cryptography")
pytestmark = pytest.mark.timeout(60)


def run(kind: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run(main())
    return asyncio.run(main())


async def accepted(member: Callable[[int], None]) -> tuple[socket.socket, threading.Thread]:
    """A connection from ``member(port)``, run in a thread: the accepted socket, non-blocking
    (for ``tls_stream.accept``), and the thread."""
    loop = asyncio.get_running_loop()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        thread = threading.Thread(target=member, args=(server.getsockname()[1],))
        thread.start()
        sock, _ = await loop.sock_accept(server)
    sock.setblocking(False)
    return sock, thread


class Collecting(asyncio.BufferedProtocol):
    """A protocol that keeps what it reads and what happens to it."""

    def __init__(self) -> None:
        self.buffer = bytearray(1 << 16)
        self.got = bytearray()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.losses = 0

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.got += self.buffer[:nbytes]

    def connection_lost(self, exc: Exception | None) -> None:
        self.losses += 1
        if not self.lost.done():
            self.lost.set_result(exc)


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset, as a process killed with data unread does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("size", [5, 3 << 20], ids=["small records", "over the read budget"])
def test_what_came_before_a_reset_is_all_read(certs: Path, loop_kind: str, size: int) -> None:
    """Requests that arrived while the loop was busy, then a reset: every byte reaches the
    protocol, then connection_lost, once (uvloop does not call a reader again after it)."""
    payloads = [bytes([65 + i]) * size for i in range(3)]

    go = threading.Event()

    def member(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as raw:
            sock = client_context(certs).wrap_socket(raw, server_hostname="127.0.0.1")
            go.wait(10)
            for payload in payloads:
                sock.sendall(payload)
            time.sleep(0.1)
            reset(sock)

    async def main() -> tuple[bytes, int]:
        loop = asyncio.get_running_loop()
        sock, thread = await accepted(member)
        secured = await tls_stream.accept(loop, sock, server_context(certs), 5)
        protocol = Collecting()
        loop.call_soon(lambda: (go.set(), time.sleep(0.5)))  # the loop is busy meanwhile
        tls_stream.TLSStream(loop, secured, protocol)
        await asyncio.wait_for(asyncio.shield(protocol.lost), 10)
        await asyncio.sleep(0.05)
        await loop.run_in_executor(None, thread.join, 10)
        return bytes(protocol.got), protocol.losses

    got, losses = run(loop_kind, main)
    assert got == b"".join(payloads)
    assert losses == 1


def big_certificate(certs: Path) -> str:
    """A loader certificate of some 40 KB, whose handshake flight outgrows a small send
    buffer; returns its name in ``certs``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_key: Any = serialization.load_pem_private_key((certs / "ca-key.pem").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    names += [x509.DNSName(f"host{i:05d}.example.internal") for i in range(1500)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "big")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (certs / "big.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (certs / "big-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return "big"


def by_hand(
    certs: Path, sock: socket.socket, after_hello: Callable[[], object] = lambda: None
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A member's side of a TLS handshake on ``sock``, through memory BIOs, up to its
    Finished, left unsent in the outgoing BIO (the test sends it when it chooses); its TLS
    object, incoming and outgoing BIOs. ``after_hello``: run once its ClientHello is sent."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_object = client_context(certs).wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls_object.do_handshake()
    sock.sendall(outgoing.read())  # ClientHello
    after_hello()
    while True:
        try:
            tls_object.do_handshake()
            return tls_object, incoming, outgoing
        except ssl.SSLWantReadError:
            incoming.write(sock.recv(1 << 20))


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_handshake_waiting_for_the_member_does_not_spin(certs: Path, loop_kind: str) -> None:
    """The loader's flight did not fit its send buffer (it waited to write), then it waits a
    second for the member's Finished: it waits without running."""
    context = server_context(certs, big_certificate(certs))
    calls = [0]

    class Counting(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            calls[0] += 1
            super().do_handshake(block)

    context.sslsocket_class = Counting
    waiting: list[int] = []

    def member(port: int) -> None:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            sock.connect(("127.0.0.1", port))
            sock.settimeout(5)
            # The loader's flight waits for room meanwhile.
            _, _, outgoing = by_hand(certs, sock, after_hello=lambda: time.sleep(0.3))
            before = calls[0]
            time.sleep(1.0)  # a slow member: its Finished comes a second later
            waiting.append(calls[0] - before)
            sock.sendall(outgoing.read())
            time.sleep(0.2)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock, thread = await accepted(member)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        secured = await tls_stream.accept(loop, sock, context, 10)
        secured.close()
        await loop.run_in_executor(None, thread.join, 10)

    run(loop_kind, main)
    assert waiting and waiting[0] <= 2  # a wake-up or two, not one per loop turn


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_newcomer_closed_as_its_handshake_ends_stays_closed(certs: Path, loop_kind: str) -> None:
    """The listener closes a newcomer (over the cap, or stopping) just after its TLS
    handshake's last step, before its task resumes: no protocol is made for it.

    The member sends its Finished only once the loader's first handshake step has returned,
    so that the last step is the reader's, not the task's own first one (which a member
    quick enough, on a busy machine, could otherwise make it)."""
    context = server_context(certs)
    hook: dict[str, Callable[[], None]] = {}
    first_step = threading.Event()

    class Hooked(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            try:
                super().do_handshake(block)
            finally:
                first_step.set()
            if (close := hook.get("close")) is not None:
                asyncio.get_running_loop().call_soon(close)  # ahead of the task's wake-up

    context.sslsocket_class = Hooked
    protocols: list[Collecting] = []
    answer: list[bytes] = []
    ended: list[bool] = []

    def member(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(5)
            tls_object, incoming, outgoing = by_hand(certs, sock)
            assert first_step.wait(5)
            sock.sendall(outgoing.read())  # Finished
            try:
                while chunk := sock.recv(1 << 16):
                    incoming.write(chunk)
                ended.append(True)
            except OSError:  # still open after 5 s
                ended.append(False)
            try:
                answer.append(tls_object.read(10))
            except ssl.SSLError:  # closed, with or without its close_notify
                answer.append(b"")

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def factory(newcomer: listener.Newcomer) -> asyncio.BaseProtocol:
            protocols.append(Collecting())
            return protocols[-1]

        served = listener.Listener(loop, "127.0.0.1", 0, factory, handshake=5.0, context=context)

        def close_newcomers() -> None:
            for newcomer in list(served.untrusted):
                newcomer.close()

        hook["close"] = close_newcomers
        thread = threading.Thread(target=member, args=(served.socket.getsockname()[1],))
        thread.start()
        await loop.run_in_executor(None, thread.join, 10)
        served.close()

    run(loop_kind, main)
    assert protocols == []
    assert ended == [True] and answer == [b""]


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_protocol_that_raises_loses_its_connection(
    certs: Path, loop_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in the protocol's handling of what came closes the connection, with a log
    line, as a loop's own transports do: it does not go on half-handled."""

    class Failing(Collecting):
        def buffer_updated(self, nbytes: int) -> None:
            raise RuntimeError("a bug in the handler")

    ended: list[bytes] = []

    def member(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as raw:
            sock = client_context(certs).wrap_socket(raw, server_hostname="127.0.0.1")
            sock.settimeout(5)
            sock.sendall(b"a request")
            try:
                ended.append(sock.recv(10))
            except (OSError, ssl.SSLError):
                ended.append(b"")

    async def main() -> Exception | None:
        loop = asyncio.get_running_loop()
        sock, thread = await accepted(member)
        secured = await tls_stream.accept(loop, sock, server_context(certs), 5)
        protocol = Failing()
        tls_stream.TLSStream(loop, secured, protocol)
        lost = await asyncio.wait_for(asyncio.shield(protocol.lost), 10)
        await loop.run_in_executor(None, thread.join, 10)
        return lost

    lost = run(loop_kind, main)
    assert isinstance(lost, RuntimeError)
    assert ended == [b""]
    assert "its protocol failed" in caplog.text


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_the_end_of_input_is_told_once_and_a_stopped_loop_is_let_go(
    certs: Path, loop_kind: str
) -> None:
    """A protocol that keeps a half-closed connection hears eof_received once, not at every
    sweep; and a loop that stopped with that stream open is not kept by the next loop's."""

    class HalfOpen(Collecting):
        ends = 0

        def eof_received(self) -> bool:
            self.ends += 1
            return True

    def member(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as raw:
            sock = client_context(certs).wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(b"last words")
            socket.socket.shutdown(sock, socket.SHUT_WR)  # the end of its input, in TCP
            time.sleep(1.5)

    async def main() -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        sock, thread = await accepted(member)
        secured = await tls_stream.accept(loop, sock, server_context(certs), 5)
        protocol = HalfOpen()
        tls_stream.TLSStream(loop, secured, protocol)
        await asyncio.sleep(4 * tls_stream.SWEEP)
        await loop.run_in_executor(None, thread.join, 10)
        return protocol.ends, bytes(protocol.got)  # the stream is left open

    assert run(loop_kind, main) == (1, b"last words")

    async def another() -> bool:
        tls_stream._Sweeper.of(asyncio.get_running_loop())
        return all(not loop.is_closed() for loop in tls_stream._SWEEPERS)

    assert run(loop_kind, another)
