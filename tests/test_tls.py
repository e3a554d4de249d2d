"""TLS between real loader and member processes: a working cluster, each refusal, tampering."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import clustorage
from clustorage import tls_init
from tests.conftest import COOKIE, ROOT, Cluster, Member, free_port, loader_argv

pytest.importorskip("cryptography")
pytestmark = pytest.mark.timeout(90)


def tls_env(folder: Path, node: str) -> dict[str, str]:
    """The CLUSTORAGE_TLS_* variables of ``node``'s files in ``folder``."""
    return {
        "CLUSTORAGE_TLS_CERT": str(folder / f"{node}.pem"),
        "CLUSTORAGE_TLS_KEY": str(folder / f"{node}-key.pem"),
        "CLUSTORAGE_TLS_CA": str(folder / "ca.pem"),
    }


def tls_init_cli(folder: Path, *nodes: str) -> subprocess.CompletedProcess[str]:
    args = [a for node in nodes for a in ("--node", node)]
    return subprocess.run(
        [sys.executable, "-m", "clustorage", "tls", "init", str(folder), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """A CA and certificates for app1, m1, m2, m3, made by ``clustorage tls init``."""
    folder = tmp_path / "tls"
    result = tls_init_cli(folder, "app1", "m1", "m2", "m3")
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture
def tls_cluster(cluster: Cluster, certs: Path) -> Iterator[Cluster]:
    """A TLS loader process app1; ``cluster.env`` is its environment."""
    loader_env = dict(cluster.env)
    cluster.env = dict(cluster.env, **tls_env(certs, "app1"))
    cluster.start_loader()
    cluster.env = loader_env
    yield cluster


def member(cluster: Cluster, name: str, env: dict[str, str]) -> Member:
    """A member process with ``env`` added to the cluster's environment."""
    started = Member(dict(cluster.env, **env), name, cluster.loader, log=cluster.log_of(name))
    cluster.procs.append(started.proc)
    return started


def wait_for(check: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not true within {seconds}s")


def status(cluster: Cluster, certs: Path) -> dict[str, Any]:
    probe = clustorage.Probe(
        cluster.loader,
        cookie=COOKIE,
        tls_cert=certs / "m3.pem",
        tls_key=certs / "m3-key.pem",
        tls_ca=certs / "ca.pem",
    )
    with probe:
        return probe.status()


def test_tls_cluster_gets_calls_hot_loads_and_resyncs(tls_cluster: Cluster, certs: Path) -> None:
    """Over TLS: get, call, a hot-load seen by another member, a late joiner's resync."""
    m1 = member(tls_cluster, "m1", tls_env(certs, "m1"))
    m2 = member(tls_cluster, "m2", tls_env(certs, "m2"))
    assert m1.started == {"ok": "m1"} and m2.started == {"ok": "m2"}
    assert m1.ok("node.get('answer', lambda: 6 * 7)") == 42
    assert m2.ok("node.get('answer', lambda: 0)") == 42
    m1.ok("node.define('double', 'def double(x):\\n    return 2 * x\\n')")
    assert m2.ok("node.call('double', [21])") == 42
    m1.ok("node.define('double', 'def double(x):\\n    return 3 * x\\n')")
    wait_for(lambda: m2.ok("node.call('double', [1])") == 3, 10)
    m1.ok("node.put('big', b'x' * (4 << 20))")
    m3 = member(tls_cluster, "m3", tls_env(certs, "m3"))
    assert m3.ok("sorted(node.keys())") == ["answer", "big"]
    assert m3.ok("len(node.get('big'))") == 4 << 20
    assert m3.ok("node.call('double', [2])") == 6
    result = subprocess.run(
        [sys.executable, "-m", "clustorage", "status", "--loader", tls_cluster.loader]
        + [
            f"--tls-{what}={path}"
            for what, path in zip(
                ("cert", "key", "ca"),
                (certs / "m3.pem", certs / "m3-key.pem", certs / "ca.pem"),
                strict=True,
            )
        ],
        env=tls_cluster.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "nodes     4" in result.stdout


def test_a_big_value_drains_over_tls_while_the_loader_serves_others(
    tls_cluster: Cluster, certs: Path
) -> None:
    """48 MB to a member is more than the socket takes at once: the loader's TLS stream
    keeps the rest, pauses its sender and resumes it, and answers others meanwhile."""
    m1 = member(tls_cluster, "m1", tls_env(certs, "m1"))
    m2 = member(tls_cluster, "m2", tls_env(certs, "m2"))
    digest = m1.ok(
        "(lambda b: (node.put('big', b), __import__('hashlib').sha256(b).hexdigest())[1])"
        "(__import__('random').Random(7).randbytes(48 << 20))"
    )
    m2.start_send("__import__('hashlib').sha256(node.get('big')).hexdigest()")
    for i in range(20):
        assert m1.ok(f"node.get('small{i}', lambda: {i})") == i
    answer = m2.answer()
    assert answer == {"ok": digest}


def test_plaintext_member_is_refused_by_a_tls_loader(tls_cluster: Cluster, certs: Path) -> None:
    """A member without TLS is told the loader speaks TLS; the loader logs it, serves others."""
    plain = member(tls_cluster, "m1", {})
    assert plain.started["error"] == "ConfigError"
    assert (
        "speaks TLS: start this node with --tls-cert/--tls-key/--tls-ca"
        in (plain.started["message"])
    )
    wait_for(lambda: "as a member without TLS would" in tls_cluster.loader_log(), 10)
    good = member(tls_cluster, "m2", tls_env(certs, "m2"))
    assert good.ok("node.get('k', lambda: 1)") == 1


def test_tls_member_is_refused_by_a_plaintext_loader(cluster: Cluster, certs: Path) -> None:
    """A TLS member meeting a loader without TLS says so; the loader logs it, serves others."""
    cluster.start_loader()
    tlsed = member(cluster, "m1", tls_env(certs, "m1"))
    assert tlsed.started["error"] == "ConfigError"
    assert "does not speak TLS" in tlsed.started["message"]
    wait_for(lambda: "the peer speaks TLS and this loader does not" in cluster.loader_log(), 10)
    plain = member(cluster, "m2", {})
    assert plain.ok("node.get('k', lambda: 1)") == 1


def test_certificate_of_another_ca_is_refused(
    tls_cluster: Cluster, certs: Path, tmp_path: Path
) -> None:
    """A member whose certificate another CA signed is refused at both ends."""
    other = tmp_path / "other"
    assert tls_init_cli(other, "m1").returncode == 0
    stranger = member(
        tls_cluster, "m1", dict(tls_env(other, "m1"), CLUSTORAGE_TLS_CA=str(certs / "ca.pem"))
    )
    assert stranger.started["error"] == "AuthenticationError", stranger.started
    assert "refused this node's TLS certificate" in stranger.started["message"]
    wait_for(lambda: "TLS handshake failed" in tls_cluster.loader_log(), 10)
    # And a member that trusts another CA refuses the loader's certificate.
    wary = member(
        tls_cluster, "m2", dict(tls_env(certs, "m2"), CLUSTORAGE_TLS_CA=str(other / "ca.pem"))
    )
    assert wary.started["error"] == "AuthenticationError"
    assert "certificate this node does not accept" in wary.started["message"]
    good = member(tls_cluster, "m3", tls_env(certs, "m3"))
    assert good.ok("node.get('k', lambda: 1)") == 1


def test_expired_certificate_is_refused(tls_cluster: Cluster, certs: Path, tmp_path: Path) -> None:
    """A member whose certificate has expired is refused; the loader says why."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca_cert = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((certs / "ca-key.pem").read_bytes(), None)
    key = tls_init.new_key()
    now = datetime.datetime.now(datetime.UTC)
    cert = tls_init.issue(
        ca_cert,
        ca_key,
        key,
        "old",
        [],
        now - datetime.timedelta(days=30),
        now - datetime.timedelta(days=1),
    )
    folder = tmp_path / "expired"
    folder.mkdir()
    tls_init.write_key(folder / "old-key.pem", key)
    tls_init.write_cert(folder / "old.pem", cert)
    old = member(
        tls_cluster, "m1", dict(tls_env(folder, "old"), CLUSTORAGE_TLS_CA=str(certs / "ca.pem"))
    )
    assert old.started["error"] == "AuthenticationError"
    assert "expired" in old.started["message"]
    wait_for(lambda: "certificate has expired" in tls_cluster.loader_log(), 10)
    good = member(tls_cluster, "m2", tls_env(certs, "m2"))
    assert good.ok("node.get('k', lambda: 1)") == 1


def test_loader_certificate_must_name_its_host(
    cluster: Cluster, certs: Path, tmp_path: Path
) -> None:
    """A member refuses a loader whose certificate names another host than the one dialled."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca_cert = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((certs / "ca-key.pem").read_bytes(), None)
    key = tls_init.new_key()
    cert = tls_init.issue(ca_cert, ca_key, key, "app1", ["elsewhere.example"], local=False)
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    tls_init.write_key(folder / "app1-key.pem", key)
    tls_init.write_cert(folder / "app1.pem", cert)
    plain_env = cluster.env
    cluster.env = {
        **plain_env,
        **tls_env(folder, "app1"),
        "CLUSTORAGE_TLS_CA": str(certs / "ca.pem"),
    }
    cluster.start_loader()
    cluster.env = plain_env
    wary = member(cluster, "m1", tls_env(certs, "m1"))
    assert wary.started["error"] == "AuthenticationError"
    assert "address mismatch" in wary.started["message"]


def test_key_of_another_certificate_is_refused_at_start(cluster: Cluster, certs: Path) -> None:
    """A key that does not match its certificate stops the loader at start, naming both."""
    env = {**cluster.env, **tls_env(certs, "app1"), "CLUSTORAGE_TLS_KEY": str(certs / "m1-key.pem")}
    result = subprocess.run(
        loader_argv("app1", f"127.0.0.1:{free_port()}", "--data", ":memory:"),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert (
        f"the key {certs / 'm1-key.pem'} (--tls-key) does not match the certificate"
        in result.stderr
    )
    assert str(certs / "app1.pem") in result.stderr
    half = subprocess.run(
        [sys.executable, "-m", "clustorage", "status", "--loader", "app1", "--tls-cert", "x.pem"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert half.returncode == 2 and "missing --tls-key" in half.stderr


class Relay:
    """A TCP relay between members and the loader, on a port of its own."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def ends(self, member_side: socket.socket) -> tuple[socket.socket, socket.socket]:
        """The member's end and the loader's, for a connection the relay accepted."""
        return member_side, socket.create_connection(("127.0.0.1", self.target))

    def carry(self, data: bytes, upstream: bool) -> bytes:
        """What goes on of ``data``, which came from the member if ``upstream``."""
        return data

    def _accept(self) -> None:
        while True:
            try:
                member_side, loader_side = self.ends(self.listener.accept()[0])
            except OSError:
                if self.listener.fileno() < 0:
                    return
                continue
            self.sockets += [member_side, loader_side]
            for source, sink, upstream in (
                (member_side, loader_side, True),
                (loader_side, member_side, False),
            ):
                threading.Thread(
                    target=self._pipe, args=(source, sink, upstream), daemon=True
                ).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(self.carry(data, upstream))
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


class FlippingRelay(Relay):
    """A relay that flips one byte on request."""

    def __init__(self, target: int, upstream: bool = True) -> None:
        self.upstream = upstream  # flip member -> loader, else loader -> member
        self.flip_next = threading.Event()  # flip a byte of the next chunk that way
        self.flipped = threading.Event()
        super().__init__(target)

    def carry(self, data: bytes, upstream: bool) -> bytes:
        if upstream is self.upstream and self.flip_next.is_set() and len(data) > 10:
            self.flip_next.clear()
            data = data[:-5] + bytes([data[-5] ^ 0x01]) + data[-4:]
            self.flipped.set()
        return data


def test_byte_flipped_in_between_closes_and_applies_nothing(
    tls_cluster: Cluster, certs: Path
) -> None:
    """A man in the middle flipping one byte of a TLS record: the loader closes the connection
    and applies nothing; the member reconnects and goes on."""
    relay = FlippingRelay(tls_cluster.port)
    try:
        env = dict(
            tls_cluster.env,
            **tls_env(certs, "m1"),
            CLUSTORAGE_LOADER=f"app1@127.0.0.1:{relay.port}",
        )
        m1 = Member(env, "m1", f"app1@127.0.0.1:{relay.port}", log=tls_cluster.log_of("m1"))
        tls_cluster.procs.append(m1.proc)
        assert m1.started == {"ok": "m1"}
        relay.flip_next.set()
        answer = m1.send("node.put('tampered', 1)")
        assert relay.flipped.is_set()
        assert "ok" not in answer, answer
        wait_for(
            lambda: "a TLS record failed its check" in tls_cluster.loader_log(),
            10,
        )
        assert status(tls_cluster, certs)["keys"] == 0
        wait_for(lambda: m1.ok("node.connected"), 20)
        m1.ok("node.put('honest', 2)")
        assert status(tls_cluster, certs)["keys"] == 1
    finally:
        relay.close()


def test_byte_flipped_towards_the_member_drops_it_unapplied(
    tls_cluster: Cluster, certs: Path
) -> None:
    """A byte flipped on its way to a member: TLS refuses the record, the member drops the
    connection (the loader sees it leave), reconnects and gets the value by resync once."""
    relay = FlippingRelay(tls_cluster.port, upstream=False)
    try:
        env = dict(tls_cluster.env, **tls_env(certs, "m1"))
        m1 = Member(env, "m1", f"app1@127.0.0.1:{relay.port}", log=tls_cluster.log_of("m1"))
        tls_cluster.procs.append(m1.proc)
        m2 = member(tls_cluster, "m2", tls_env(certs, "m2"))
        assert m1.started == {"ok": "m1"} and m2.started == {"ok": "m2"}
        m1.ok(
            "seen = []\n"
            "node.on_load(lambda event: seen.append(event.key))\n"
            "import logging; logging.getLogger().setLevel(logging.WARNING)"
        )
        relay.flip_next.set()
        m2.ok("node.put('pushed', 1)")
        wait_for(relay.flipped.is_set, 10)
        wait_for(lambda: tls_cluster.loader_log().count("m1 joined") == 2, 20)
        assert "m1 left" in tls_cluster.loader_log()
        wait_for(lambda: m1.ok("'pushed' in node.keys()"), 20)  # after its resync
        assert m1.ok("node.get('pushed')") == 1
        # The hot-load in the flipped record was never applied: the value came by resync.
        assert m1.ok("seen.count('pushed')") == 1
    finally:
        relay.close()


class TerminatingRelay(Relay):
    """A relay that holds certificates of the cluster's CA but not the cookie: it ends the
    member's TLS with the loader's certificate, opens its own TLS to the loader with a member's
    certificate, and passes the bytes between the two, reading all of them."""

    def __init__(self, certs: Path, target: int) -> None:
        self.seen = bytearray()
        self.server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server.load_cert_chain(certs / "app1.pem", certs / "app1-key.pem")
        self.server.load_verify_locations(certs / "ca.pem")
        self.server.verify_mode = ssl.CERT_REQUIRED
        self.client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.client.load_cert_chain(certs / "m2.pem", certs / "m2-key.pem")
        self.client.load_verify_locations(certs / "ca.pem")
        super().__init__(target)

    def ends(self, member_side: socket.socket) -> tuple[socket.socket, socket.socket]:
        plain = socket.create_connection(("127.0.0.1", self.target))
        return (
            self.server.wrap_socket(member_side, server_side=True),
            self.client.wrap_socket(plain, server_hostname="127.0.0.1"),
        )

    def carry(self, data: bytes, upstream: bool) -> bytes:
        self.seen += data
        return data


def test_a_relay_with_the_clusters_certificates_fails_the_cookie_handshake(
    tls_cluster: Cluster, certs: Path
) -> None:
    """Inside TLS the cookie handshake is bound to the TLS session (tls-unique), so a relay
    holding certificates of the cluster's CA, but not the cookie, cannot join two TLS
    sessions into one cluster connection: both ends refuse, and no frame crosses."""
    relay = TerminatingRelay(certs, tls_cluster.port)
    try:
        env = dict(tls_cluster.env, **tls_env(certs, "m1"))
        tricked = Member(env, "m1", f"app1@127.0.0.1:{relay.port}", log=tls_cluster.log_of("m1"))
        tls_cluster.procs.append(tricked.proc)
        assert tricked.started["error"] == "AuthenticationError", tricked.started
        assert "relays the connection" in tricked.started["message"]
        wait_for(lambda: "wrong cookie" in tls_cluster.loader_log(), 10)
        assert "m1 joined" not in tls_cluster.loader_log()
        assert relay.seen.startswith(b"CLST")  # it read the handshake, and no more came
        good = member(tls_cluster, "m3", tls_env(certs, "m3"))
        assert good.ok("node.get('k', lambda: 1)") == 1
    finally:
        relay.close()


def test_tls_handshake_within_the_handshake_deadline(tls_cluster: Cluster, certs: Path) -> None:
    """A connection that starts TLS and stalls is closed by the 5 s handshake deadline; the
    loader serves members meanwhile."""
    with socket.create_connection(("127.0.0.1", tls_cluster.port), timeout=30) as stalled:
        stalled.sendall(b"\x16\x03\x01")  # the start of a ClientHello, and no more
        good = member(tls_cluster, "m1", tls_env(certs, "m1"))
        assert good.ok("node.get('k', lambda: 1)") == 1
        assert stalled.recv(100) == b""  # closed by the loader, not by this timeout
    wait_for(lambda: "no handshake within 5.0s" in tls_cluster.loader_log(), 10)


def test_shell_takes_the_tls_flags(cluster: Cluster, certs: Path) -> None:
    """clustorage-shell has --tls-cert/--tls-key/--tls-ca: a key of another certificate is
    refused before anything starts, naming both files."""
    flags = ["--tls-cert", str(certs / "m1.pem"), "--tls-key", str(certs / "m2-key.pem")]
    flags += ["--tls-ca", str(certs / "ca.pem")]
    done = subprocess.run(
        [sys.executable, "-m", "clustorage.shell", "--name", "m1", "--loader", "app1", *flags],
        env=cluster.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "does not match the certificate" in done.stderr and "m2-key.pem" in done.stderr


def test_tls_init_makes_private_files_and_names_the_extra(tmp_path: Path) -> None:
    """'clustorage tls init' writes keys 0600 in a 0700 folder; without cryptography it
    names the extra to install."""
    folder = tmp_path / "certs"
    result = tls_init_cli(folder, "a")
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for key in ("ca-key.pem", "a-key.pem"):
        assert stat.S_IMODE((folder / key).stat().st_mode) == 0o600
    again = tls_init_cli(folder, "b")  # the CA is kept: b joins a's cluster
    assert again.returncode == 0 and "ca.pem" not in again.stdout
    missing = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['cryptography'] = None; "
            "from clustorage.cli import main; sys.exit(main(['tls', 'init', sys.argv[1]]))",
            str(tmp_path / "none"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=dict(os.environ),
    )
    assert missing.returncode == 2
    assert "pip install 'clustorage[tls]'" in missing.stderr
