"""Hostile input: every bad peer costs one closed connection and a log line, nothing more."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import cloudpickle
import psutil
import pytest

from clustorage import messages
from clustorage.hello import handshake_meta
from clustorage.protocol import MAGIC, VERSION, Connection, Role
from tests.conftest import COOKIE, Cluster, free_port, rss_kib, wait_for_port

pytestmark = pytest.mark.timeout(120)


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Whether the loader closes ``sock`` within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def flip_last(frame: bytes) -> bytes:
    """``frame`` with one bit of its last byte flipped."""
    return frame[:-1] + bytes([frame[-1] ^ 1])


def authenticated(port: int, name: str) -> tuple[socket.socket, Connection]:
    """A raw, authenticated member connection (the test speaks the protocol itself)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = Connection(
        Role.CLIENT,
        COOKIE.encode(),
        {
            "name": name,
            "python": "{}.{}".format(*sys.version_info[:2]),
            "cloudpickle": cloudpickle.__version__.split(".")[0],
        },
    )
    while conn.state.name != "OPEN":
        conn.receive_data(sock.recv(65536))
        conn.next_event()
        sock.sendall(conn.data_to_send())
    return sock, conn


def keep_alive(
    sock: socket.socket, conn: Connection, stop: threading.Event, every: float, read: int = 0
) -> threading.Thread:
    """A started thread that, every ``every`` seconds until ``stop``, reads up to ``read``
    bytes from ``sock`` (if any) and sends a heartbeat."""

    def beat() -> None:
        while not stop.wait(every):
            try:
                if read:
                    sock.recv(read)
                sock.sendall(conn.heartbeat())
            except OSError:
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        os.urandom(4096),
        MAGIC + b"\x00\x01" + os.urandom(32) + os.urandom(32) + b"\xff\xff",
        MAGIC + b"\x00\x63" + os.urandom(100),
        b"",
    ],
    ids=["http", "random", "oversized-meta", "wrong-version", "eof"],
)
def test_garbage_before_the_handshake_costs_one_connection(
    cluster: Cluster, garbage: bytes
) -> None:
    """Garbage, an HTTP request or an early EOF: that connection closes, others are served."""
    cluster.start_loader()
    member = cluster.member("m")
    sock = socket.create_connection(("127.0.0.1", cluster.port))
    sock.sendall(garbage)
    if not garbage:
        sock.shutdown(socket.SHUT_WR)
    assert closed_by_peer(sock, 10)
    sock.close()
    assert member.ok("node.get('fine', lambda: 1)") == 1
    assert member.ok("node.connected") is True


def test_replayed_handshake_is_refused(cluster: Cluster) -> None:
    """A recorded handshake response replayed on a new connection fails authentication."""
    cluster.start_loader()
    first = socket.create_connection(("127.0.0.1", cluster.port), timeout=10)
    conn = Connection(Role.CLIENT, COOKIE.encode(), {"name": "spy", "python": "x"})
    conn.receive_data(first.recv(65536))
    conn.next_event()
    recorded = conn.data_to_send()
    first.sendall(recorded)
    first.close()
    second = socket.create_connection(("127.0.0.1", cluster.port), timeout=10)
    second.recv(65536)
    second.sendall(recorded)
    assert second.recv(16)[:1] == b"R"
    assert closed_by_peer(second, 10)
    assert "wrong cookie" in cluster.loader_log()


def test_frame_attacks_after_authentication(cluster: Cluster) -> None:
    """Oversized, truncated, forged and replayed frames from a member close only its connection."""
    cluster.start_loader()
    member = cluster.member("m")
    attacks = {
        "oversized": lambda c: struct.pack("!IQ", 0xFFFFFFFF, 0) + b"\0" * 32,
        "forged": lambda c: flip_last(c.send(messages.encode(messages.Status(1)))),
        "replayed": lambda c: c.send(messages.encode(messages.Status(1))) * 2,
        "truncated": lambda c: c.send(messages.encode(messages.Status(1)))[:-3],
        "not-a-message": lambda c: c.send(b"\x80\x05garbage"),
    }
    for index, (name, attack) in enumerate(attacks.items()):
        sock, conn = authenticated(cluster.port, f"attacker{index}")
        sock.sendall(attack(conn))
        if name == "truncated":
            sock.shutdown(socket.SHUT_WR)
        assert closed_by_peer(sock, 10), name
        sock.close()
    assert member.ok("node.get('still', lambda: 'served')") == "served"
    log = cluster.loader_log()
    assert "over the limit" in log
    assert "failed authentication" in log


def test_silent_connections_and_garbage_do_not_starve_members(cluster: Cluster) -> None:
    """200 silent connections plus garbage senders: a member is served, memory stays bounded."""
    loader = cluster.start_loader()
    member = cluster.member("m")
    member.ok("node.get('warm', lambda: 0)")
    baseline = rss_kib(loader.pid)
    peaks = []
    for _round in range(3):
        silent = [socket.create_connection(("127.0.0.1", cluster.port)) for _ in range(200)]
        noisy = [socket.create_connection(("127.0.0.1", cluster.port)) for _ in range(10)]
        for sock in noisy:
            sock.sendall(os.urandom(2048))
        key = f"served{_round}"
        assert member.ok(f"node.get({key!r}, lambda: {_round})") == _round
        peaks.append(rss_kib(loader.pid))
        for sock in silent + noisy:
            sock.close()
    assert peaks[-1] - baseline < 64 * 1024, (baseline, peaks)
    late = socket.create_connection(("127.0.0.1", cluster.port))
    assert closed_by_peer(late, 15), "a silent connection was never timed out"
    assert "no handshake within" in cluster.loader_log()


def test_member_that_stops_reading_is_dropped(cluster: Cluster) -> None:
    """A member that sends heartbeats but never reads is dropped once its backlog passes
    the cap (128 MiB), not before: being slow to read is not being dead. (Values of 4 MB
    are pushed to every node here: the eager limit is raised over them.)"""
    cluster.env["CLUSTORAGE_EAGER_LIMIT"] = str(1 << 30)
    loader = cluster.start_loader()
    writer = cluster.member("writer")
    sock, conn = authenticated(cluster.port, "sleeper")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    alive = threading.Event()
    beating = keep_alive(sock, conn, alive, 0.5)
    try:
        for i in range(20):
            writer.ok(f"node.put('blob{i}', b'x' * 4_000_000)")
        assert "(sleeper): it stopped reading" not in cluster.loader_log()  # 80 MB so far
        for i in range(20, 40):
            writer.ok(f"node.put('blob{i}', b'x' * 4_000_000)")
        deadline = time.monotonic() + 40
        while "(sleeper): it stopped" not in cluster.loader_log() and time.monotonic() < deadline:
            time.sleep(0.2)
        log = cluster.loader_log()
        assert "(sleeper): it stopped reading, with" in log
        assert "over the backlog cap of 128 MiB" in log
        assert writer.ok("len(node.keys())") == 40
        assert rss_kib(loader.pid) < 400 * 1024
    finally:
        alive.set()
        beating.join(5)
        sock.close()


def answers(sock: socket.socket, conn: Connection, count: int) -> list[messages.Message]:
    """The next ``count`` messages (not pushes) the loader sends on ``sock``."""
    found: list[messages.Message] = []
    while len(found) < count:
        data = sock.recv(1 << 16)
        assert data, "the loader closed the connection"
        for payload in conn.read_frames(data):
            message = messages.decode(payload)
            if getattr(message, "rid", None) is not None:
                found.append(message)
    return found


def test_a_second_resync_on_one_connection_is_refused(cluster: Cluster) -> None:
    """A connection resynchronises once: asking again (which would make the loader queue
    its whole store again, outside the write limit) is answered with an error."""
    cluster.start_loader()
    writer = cluster.member("writer")
    writer.ok("node.put('k', b'v' * 100_000)")
    sock, conn = authenticated(cluster.port, "twice")
    try:
        sock.sendall(conn.send(messages.encode(messages.Sync(1, {}))))
        (first,) = answers(sock, conn, 1)
        assert type(first) is messages.SyncReply
        sock.sendall(conn.send(messages.encode(messages.Sync(2, {}))))
        (second,) = answers(sock, conn, 1)
        assert type(second) is messages.Failed
        assert "once" in second.message
    finally:
        sock.close()


def start_loader_with(
    cluster: Cluster, preexec: Callable[[], None], data: str = ":memory:"
) -> subprocess.Popen[Any]:
    """A real ``clustorage loader`` that runs ``preexec`` in its process before it starts."""
    cluster.port = free_port()
    with open(cluster.tmp / "loader-app1.log", "a") as log:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "clustorage", "loader", "--name", "app1"),
                *("--listen", f"127.0.0.1:{cluster.port}", "--data", data),
            ],
            env=cluster.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,
        )
    cluster.procs.append(proc)
    wait_for_port(cluster.port, time.monotonic() + 30, proc)
    return proc


class SlowLoris:
    """``count`` connections that each send one byte of a handshake a second, and reconnect
    as soon as the loader closes one (a hostile client without the cookie)."""

    PREFIX = MAGIC + VERSION.to_bytes(2, "big") + bytes(200)

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.socks: list[tuple[socket.socket, int]] = [self._connect() for _ in range(count)]
        self.reconnects = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _connect(self) -> tuple[socket.socket, int]:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", self.port))
        return sock, 0

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for index, (sock, sent) in enumerate(self.socks):
                try:
                    with contextlib.suppress(BlockingIOError):
                        if sock.recv(65536) == b"":
                            raise ConnectionResetError
                    sent += sock.send(self.PREFIX[sent % len(self.PREFIX) :][:1])
                    self.socks[index] = (sock, sent)
                except BlockingIOError:
                    pass  # still connecting
                except OSError:
                    sock.close()
                    self.socks[index] = self._connect()
                    self.reconnects += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock, _ in self.socks:
            sock.close()


def test_slow_loris_under_a_low_fd_limit_does_not_starve_members(cluster: Cluster) -> None:
    """300 connections trickling a handshake at 1 byte/s against a loader limited to 256
    file descriptors: each is closed by the absolute deadline or the cap, and members
    still connect and write throughout."""

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    loader = start_loader_with(cluster, low_fd_limit)
    attack = SlowLoris(cluster.port, 300)
    try:
        time.sleep(7)  # past the handshake deadline: the attack is in full swing
        first = cluster.member("first")
        assert "ok" in first.started, first.started
        for i in range(20):
            assert first.ok(f"node.put('k{i}', {i}); node.get('k{i}')") == i
            time.sleep(0.25)
        late = cluster.member("late")
        assert "ok" in late.started, late.started
        assert late.ok("node.get('k19')") == 19
        assert late.ok("node.put('late', 1); node.get('late')") == 1
        assert attack.reconnects > 300, "the slow connections were never closed"
        assert loader.poll() is None
    finally:
        attack.close()
    log = cluster.loader_log()
    assert "no handshake within 5.0s" in log or "over the cap of 32 at once" in log
    assert "Traceback" not in log


class PeakRss:
    """The highest resident memory of process ``pid`` while the block runs, in KiB."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._process.memory_info().rss >> 10)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.mark.parametrize(("puts", "size"), [(200, 1_000_000), (4000, 60_000)], ids=["1MB", "60KB"])
def test_members_that_stop_reading_keep_loader_memory_bounded(
    cluster: Cluster, puts: int, size: int
) -> None:
    """4 SIGSTOPped members while another puts 200-240 MB (1 MB or 60 KB values, a key
    each): the loader shares the frames between them (its memory grows by little more than
    what it holds), drops each at its backlog cap with one log line, stays under 1.5 GB,
    and the members catch up once they run again."""
    loader = cluster.start_loader()
    stopped = [cluster.member(f"sleeper{i}") for i in range(4)]
    writer = cluster.member("writer")
    for member in stopped:
        os.kill(member.proc.pid, signal.SIGSTOP)
    baseline = rss_kib(loader.pid)
    try:
        with PeakRss(loader.pid) as rss:
            writer.ok(
                f"for i in range({puts}):\n    node.put(f'k{{i}}', bytes([i % 256]) * {size})"
            )
    finally:
        for member in stopped:
            os.kill(member.proc.pid, signal.SIGCONT)
    assert rss.peak < 1536 * 1024, f"the loader peaked at {rss.peak >> 10} MiB"
    # Shared, not copied per member: the backlogs cost little beyond what the loader holds.
    held = puts * size >> 10
    assert rss.peak - baseline < held + 256 * 1024, (baseline >> 10, rss.peak >> 10)
    last = f"k{puts - 1}"
    expected = [puts, (puts - 1) % 256]
    for member in stopped:
        deadline = time.monotonic() + 60
        while member.send(f"(len(node.keys()), node.get({last!r})[0])").get("ok") != expected:
            assert time.monotonic() < deadline, f"{member.name} did not catch up"
            time.sleep(0.2)
    # Memory given back after the drops and the resyncs, not kept for the backlogs.
    assert rss_kib(loader.pid) - baseline < held + 128 * 1024, rss_kib(loader.pid) >> 10
    log = cluster.loader_log()
    assert "Traceback" not in log
    assert log.count("it stopped reading, with") <= 4


@pytest.mark.timeout(120)
def test_a_value_over_the_size_limit_is_refused_before_it_is_sent(cluster: Cluster) -> None:
    """A put over the size limit (the frame limit: a payload too big for a row of the store
    has a file of its own there) gets ValueTooLarge naming that one limit, and nothing is
    sent or stored."""
    cluster.env["CLUSTORAGE_MAX_FRAME"] = str(8 << 20)
    cluster.start_loader(data=str(cluster.tmp / "data"))
    member = cluster.member("m")
    answer = member.send("node.put('huge', b'x' * 9_000_000)")
    assert answer["error"] == "ValueTooLarge", answer
    assert f"over the size limit of {8 << 20} bytes" in answer["message"]
    assert "CLUSTORAGE_MAX_FRAME" in answer["message"]
    assert member.ok("node.put('big but under', b'x' * 7_000_000)") == 1
    assert member.ok("node.keys()") == ["big but under"]
    assert "huge" not in cluster.loader_log()


def test_a_key_with_a_lone_surrogate_is_refused_with_a_clear_error(cluster: Cluster) -> None:
    """A lone surrogate in a key: the member refuses it before sending (ValueError); sent
    raw, the loader answers ValueError and logs one plain line, no traceback."""
    cluster.start_loader(data=str(cluster.tmp / "data"))
    member = cluster.member("m")
    answer = member.send("node.put('a\\ud800', 1)")
    assert answer["error"] == "ValueError", answer
    assert "lone surrogate" in answer["message"]
    sock, conn = authenticated(cluster.port, "raw")
    try:
        requests = [
            messages.Put(1, "b\ud800", b"\x80\x05K\x01."),
            messages.Define(2, "f", "def f():\n    return '\ud800'\n", False),
        ]
        sock.sendall(b"".join(conn.send(messages.encode(request)) for request in requests))
        for failed in answers(sock, conn, 2):
            assert type(failed) is messages.Failed
            assert failed.error == "ValueError"
            assert "lone surrogate" in failed.message
    finally:
        sock.close()
    assert member.ok("node.put('fine', 1); node.keys()") == ["fine"]
    log = cluster.loader_log()
    assert "refused a Put from raw" in log and "refused a Define from raw" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("name", ["", "\x1b[31mevil\n2026-01-01 INFO clustorage: forged"])
def test_node_names_the_client_would_reject_are_refused(cluster: Cluster, name: str) -> None:
    """A peer with the cookie but a name outside [A-Za-z0-9_-]{1,64} is refused with a
    message saying so; the loader's log line escapes it (no forged lines, no ANSI codes)."""
    cluster.start_loader()
    sock = socket.create_connection(("127.0.0.1", cluster.port), timeout=10)
    conn = Connection(Role.CLIENT, COOKIE.encode(), handshake_meta(name))
    try:
        welcome = None
        while welcome is None:
            data = sock.recv(65536)
            assert data, "closed without an answer"
            conn.receive_data(data)
            welcome = conn.next_event()
            sock.sendall(conn.data_to_send())
        assert welcome.meta.get("kind") == "invalid_name"  # type: ignore[union-attr]
        assert "use 1 to 64 characters" in welcome.meta["error"]  # type: ignore[union-attr]
        assert closed_by_peer(sock, 10)
    finally:
        sock.close()
    log = cluster.loader_log()
    assert "invalid node name" in log
    assert "\x1b" not in log and "\nINFO clustorage: forged" not in log
    assert not any(line.startswith("2026-01-01") for line in log.splitlines())


def test_handshake_meta_nested_deep_costs_one_connection(cluster: Cluster) -> None:
    """Meta JSON nested thousands deep (with a valid MAC) closes that connection with one
    log line, no RecursionError traceback; members are still served."""
    cluster.start_loader()
    member = cluster.member("m")
    sock = socket.create_connection(("127.0.0.1", cluster.port), timeout=10)
    conn = Connection(Role.CLIENT, COOKIE.encode(), {"name": "deep"})
    conn._meta = b'{"name":"deep","x":' + b"[" * 2000 + b"]" * 2000 + b"}"
    try:
        conn.receive_data(sock.recv(65536))
        conn.next_event()
        sock.sendall(conn.data_to_send())
        assert closed_by_peer(sock, 10)
    finally:
        sock.close()
    assert member.ok("node.put('k', 1); node.get('k')") == 1
    log = cluster.loader_log()
    assert "handshake meta is nested too deeply" in log
    assert "Traceback" not in log and "RecursionError" not in log


class Impostor:
    """A listener on 127.0.0.1 that, for each connection, either relays to ``target``
    flipping one bit of the loader's welcome (a man in the middle) or, without a target,
    answers the handshake itself with a welcome it cannot sign (an impostor loader)."""

    _HELLO_SIZE = 4 + 2 + 32  # the challenge, then b"W" and the MAC

    def __init__(self, target: int | None) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = [self.listener]
        self._spawn(self._accept)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._socks.append(client)
            if self.target is None:
                self._spawn(self._pretend, client)
            else:
                upstream = socket.create_connection(("127.0.0.1", self.target))
                self._socks.append(upstream)
                self._spawn(self._relay, client, upstream, None)
                self._spawn(self._relay, upstream, client, self._HELLO_SIZE + 5)

    @staticmethod
    def _relay(source: socket.socket, sink: socket.socket, flip_at: int | None) -> None:
        seen = 0
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if flip_at is not None and seen <= flip_at < seen + len(data):
                    at = flip_at - seen
                    data = data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]
                seen += len(data)
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    @staticmethod
    def _pretend(client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            client.sendall(MAGIC + VERSION.to_bytes(2, "big") + os.urandom(32))
            client.recv(65536)  # the member's response: it cannot be checked without the cookie
            meta = json.dumps({"name": "app1"}).encode()
            client.sendall(b"W" + os.urandom(32) + struct.pack("!H", len(meta)) + meta)
            client.recv(65536)

    def close(self) -> None:
        for sock in self._socks:
            sock.close()


@pytest.mark.parametrize("in_between", [True, False], ids=["man-in-the-middle", "impostor"])
def test_a_welcome_that_fails_its_mac_is_not_called_a_refused_cookie(
    cluster: Cluster, in_between: bool
) -> None:
    """A welcome altered on the way, or sent by a loader without the cookie: the member says
    the loader did not prove it knows the cookie, not that our cookie was refused."""
    cluster.start_loader()
    impostor = Impostor(cluster.port if in_between else None)
    try:
        member = cluster.member("m", loader=f"app1@127.0.0.1:{impostor.port}")
        assert member.started.get("error") == "AuthenticationError", member.started
        message = member.started["message"]
        assert f"the loader at app1@127.0.0.1:{impostor.port} did not prove it knows" in message
        assert "(wrong cookie there, or someone in between)" in message
        assert "refused our cookie" not in message
    finally:
        impostor.close()


def test_a_loader_refusing_our_cookie_is_still_said_so(cluster: Cluster) -> None:
    """A loader with another cookie refuses ours: the member says so, and how to fix it."""
    cluster.start_loader()
    cluster.env["CLUSTORAGE_COOKIE"] = "another-cookie"
    member = cluster.member("m")
    assert member.started.get("error") == "AuthenticationError", member.started
    assert "refused our cookie" in member.started["message"]


def test_the_handshake_deadline_is_absolute(cluster: Cluster) -> None:
    """A connection trickling a valid-looking handshake, a byte every half second, is closed
    by the 5 s deadline all the same (it used to restart with every byte)."""
    cluster.start_loader()
    sock = socket.create_connection(("127.0.0.1", cluster.port), timeout=10)
    sock.recv(65536)  # the challenge
    sock.settimeout(0.5)
    prefix = SlowLoris.PREFIX
    try:
        closed = False
        for sent in range(30):  # 15 s: three times the deadline
            try:
                if sock.recv(65536) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            try:
                sock.sendall(prefix[sent : sent + 1])
            except OSError:
                closed = True
                break
        assert closed, "a trickling handshake outlived the deadline"
    finally:
        sock.close()
    assert "no handshake within 5.0s" in cluster.loader_log()
