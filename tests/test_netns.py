"""Across hosts: loader and two members in their own network namespaces; a link is cut."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cluster, Member

pytestmark = pytest.mark.timeout(120)

PORT = 4370


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


class Hosts:
    """Three namespaces: a loader host linked to two member hosts by veth pairs."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.loader = f"cls{tag}l"
        self.members = {"a": f"cls{tag}a", "b": f"cls{tag}b"}
        self.links: dict[str, tuple[str, str, str]] = {}
        self.made: list[str] = []

    def create(self) -> None:
        for ns in (self.loader, *self.members.values()):
            result = ip("netns", "add", ns)
            if result.returncode != 0:
                raise OSError(result.stderr.strip())
            self.made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        for index, (member, ns) in enumerate(self.members.items(), start=1):
            outer, inner = f"v{ns[-6:]}l", f"v{ns[-6:]}m"
            net = f"10.250.{index}"
            checks = [
                ip(
                    "link",
                    "add",
                    outer,
                    "netns",
                    self.loader,
                    "type",
                    "veth",
                    "peer",
                    inner,
                    "netns",
                    ns,
                ),
                ip("-n", self.loader, "addr", "add", f"{net}.1/30", "dev", outer),
                ip("-n", ns, "addr", "add", f"{net}.2/30", "dev", inner),
                ip("-n", self.loader, "link", "set", outer, "up"),
                ip("-n", ns, "link", "set", inner, "up"),
            ]
            for result in checks:
                if result.returncode != 0:
                    raise OSError(result.stderr.strip())
            self.links[member] = (ns, inner, f"{net}.1")

    def cut(self, member: str, up: bool) -> None:
        ns, inner, _ = self.links[member]
        result = ip("-n", ns, "link", "set", inner, "up" if up else "down")
        assert result.returncode == 0, result.stderr

    def destroy(self) -> None:
        for ns in self.made:
            ip("netns", "del", ns)


@contextlib.contextmanager
def namespaces(made: Any) -> Iterator[Any]:
    """``made``'s network namespaces, created, then removed; skips the test where this
    machine cannot make them."""
    if sys.platform != "linux" or shutil.which("ip") is None:
        pytest.skip("needs Linux with iproute2 ('ip') to make network namespaces")
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (ip netns add)")
    try:
        made.create()
    except OSError as exc:
        made.destroy()
        pytest.skip(f"this machine cannot create network namespaces: {exc}")
    try:
        yield made
    finally:
        made.destroy()


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Network namespaces made for this test and removed after it."""
    with namespaces(Hosts()) as made:
        yield made


def wait_for(check: object, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"not true within {seconds}s")


def start_across(
    cluster: Cluster,
    hosts: Hosts,
    data: str,
    envs: dict[str, dict[str, str]] | None = None,
) -> dict[str, Member]:
    """Loader app1 on the loader's host (its log in the cluster's folder) and a member on
    each other host; ``envs``: each one's environment ("app1" and the member names),
    the cluster's by default."""
    envs = envs or {}
    log = open(cluster.tmp / "loader-app1.log", "w")  # noqa: SIM115
    command = [sys.executable, "-m", "clustorage", "loader", "--name", "app1"]
    options = ["--listen", f"0.0.0.0:{PORT}", "--data", data]
    loader = subprocess.Popen(
        ["ip", "netns", "exec", hosts.loader, *command, *options],
        env=envs.get("app1", cluster.env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    cluster.procs.append(loader)
    members = {}
    for name, (ns, _inner, address) in hosts.links.items():
        prefix = ("ip", "netns", "exec", ns)
        members[name] = Member(
            envs.get(name, cluster.env),
            name,
            f"app1@{address}:{PORT}",
            prefix,
            log=cluster.log_of(name),
        )
        cluster.procs.append(members[name].proc)
    return members


def test_cut_link_reconnects_and_resyncs(cluster: Cluster, hosts: Hosts, tmp_path: Path) -> None:
    """A member whose link is cut keeps its hits, then reconnects and resyncs when it is back."""
    cut_and_heal(cluster, hosts, tmp_path, tls=False)


def test_cut_link_heals_over_tls(cluster: Cluster, hosts: Hosts, tmp_path: Path) -> None:
    """The same over TLS, with certificates from 'clustorage tls init' naming the loader's
    addresses on both links."""
    pytest.importorskip("cryptography")
    cut_and_heal(cluster, hosts, tmp_path, tls=True)


def test_a_stopped_member_behind_a_cut_link_is_dropped(
    cluster: Cluster, hosts: Hosts, tmp_path: Path
) -> None:
    """A stopped member keeps its connection while writes fill its window (its kernel answers
    the loader's probes); once its link is cut as well, it is dropped, its lease passed on."""
    cluster.env["CLUSTORAGE_DEAD_AFTER"] = "3"
    members = start_across(cluster, hosts, ":memory:")
    a, b = members["a"], members["b"]
    wait_for(lambda: a.ok("node.connected") and b.ok("node.connected"), 30)
    started = tmp_path / "started"
    b.start_send(
        f"import pathlib, time\nnode.get('held', lambda: pathlib.Path({str(started)!r}).touch()"
        " or time.sleep(600))"
    )
    wait_for(started.exists, 30)
    os.kill(b.proc.pid, signal.SIGSTOP)
    try:
        a.ok("for i in range(40):\n    node.put(f'noise{i % 5}', bytes([i]) * 200_000)")
        time.sleep(4)  # past dead_after (3 s) with its window closed: still connected
        assert "b left" not in cluster.loader_log()
        hosts.cut("b", up=False)
        wait_for(lambda: "b left" in cluster.loader_log(), 30)
        assert a.ok("node.get('held', lambda: 'from a')") == "from a"
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)


def cut_and_heal(cluster: Cluster, hosts: Hosts, tmp_path: Path, tls: bool) -> None:
    # A cut host is taken for dead after dead_after seconds: 3 rather than the default 15.
    quick = dict(cluster.env, CLUSTORAGE_DEAD_AFTER="3")
    envs = {name: quick for name in ("app1", *hosts.links)}
    if tls:
        folder = tmp_path / "tls"
        made = subprocess.run(
            [sys.executable, "-m", "clustorage", "tls", "init", str(folder)]
            + [a for name in envs for a in ("--node", name)]
            + [a for *_, address in hosts.links.values() for a in ("--host", address)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stderr
        envs = {
            name: dict(
                quick,
                CLUSTORAGE_TLS_CERT=str(folder / f"{name}.pem"),
                CLUSTORAGE_TLS_KEY=str(folder / f"{name}-key.pem"),
                CLUSTORAGE_TLS_CA=str(folder / "ca.pem"),
            )
            for name in envs
        }
    members = start_across(cluster, hosts, str(tmp_path / "data"), envs)
    a, b = members["a"], members["b"]
    wait_for(lambda: a.ok("node.connected") and b.ok("node.connected"), 30)
    a.ok("node.put('before', 1)")
    wait_for(lambda: b.ok("node.keys()") == ["before"], 10)

    hosts.cut("b", up=False)
    a.ok("node.put('during', 2)\nnode.define('f', 'lambda: 3')")
    assert b.ok("node.get('before')") == 1
    wait_for(lambda: not b.ok("node.connected"), 20)
    wait_for(lambda: "b left" in cluster.loader_log(), 20)

    hosts.cut("b", up=True)
    wait_for(lambda: b.ok("node.connected"), 30)
    assert b.ok("sorted(node.keys())") == ["before", "during"]
    assert b.ok("node.call('f')") == 3
    assert b.ok("node.get('after', lambda: 4)") == 4
    assert a.ok("node.get('after')") == 4
