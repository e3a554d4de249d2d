"""High availability: loaders on one PostgreSQL store, one active and the others standing by."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from clustorage.errors import StoreError
from clustorage.messages import VALUE, Entry
from tests.conftest import Cluster, Member, free_port, loader_argv, wait_for_port
from tests.pg_helpers import PostgresServer
from tests.test_netns import namespaces

DEAD_AFTER = "2"


class HACluster(Cluster):
    """Loaders of app1 on one PostgreSQL store, each on a port of its own, and members."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        super().__init__(tmp_path)
        self.url = url
        self.env["CLUSTORAGE_DEAD_AFTER"] = DEAD_AFTER
        self.ports = [free_port(), free_port()]
        self.loaders: dict[int, subprocess.Popen[Any]] = {}

    @property
    def loader(self) -> str:
        return "app1@" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start_on(self, port: int) -> subprocess.Popen[Any]:
        """A ``clustorage loader --store URL`` on ``port``; returns once it listens."""
        log = open(self.tmp / f"loader-{port}.log", "a")  # noqa: SIM115
        proc = subprocess.Popen(
            loader_argv("app1", f"127.0.0.1:{port}", "--store", self.url),
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        self.loaders[port] = proc
        wait_for_port(port, time.monotonic() + 30, proc)
        return proc

    def leader(self) -> tuple[int, int]:
        """The active loader's (epoch, port), from the leader row."""
        import psycopg

        with psycopg.connect(self.url, connect_timeout=5) as db:
            row = db.execute("SELECT epoch, address FROM clustorage_leader").fetchone()
        assert row is not None
        return int(row[0]), int(str(row[1]).rpartition(":")[2])

    def since(self) -> float:
        """When the active loader took the lock (time.time() on this machine)."""
        import psycopg

        with psycopg.connect(self.url, connect_timeout=5) as db:
            row = db.execute("SELECT since FROM clustorage_leader").fetchone()
        assert row is not None
        return float(row[0])

    def wait_leader(self, after: int = 0, timeout: float = 30) -> tuple[int, int]:
        """The leader once its epoch is over ``after``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                epoch, port = self.leader()
                if epoch > after:
                    return epoch, port
            except (AssertionError, OSError, ImportError):
                pass
            except Exception as exc:  # the database restarting
                if type(exc).__module__.split(".")[0] != "psycopg":
                    raise
            assert time.monotonic() < deadline, "no loader took over"
            time.sleep(0.05)


@pytest.fixture
def ha(tmp_path: Path, pg_url: str) -> Any:
    """Two loaders of app1 on a fresh database, killed by PID at the end."""
    cluster = HACluster(tmp_path, pg_url)
    try:
        for port in cluster.ports:
            cluster.start_on(port)
        cluster.wait_leader()
        yield cluster
    finally:
        cluster.close()


STORM = r"""
import threading, time
acked_puts, acked_defs, ran, failures = {}, {}, [], collections.Counter()
stop = threading.Event()

def patiently(call):
    deadline = time.monotonic() + 60
    while True:
        try:
            return call()
        except (clustorage.LoaderUnavailable, clustorage.StoreError, clustorage.LeaseLost):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)

def storm():
    i = 0
    while not stop.is_set():
        i += 1
        key = f"{node.name}-p{i}"
        try:
            node.put(key, i)
            acked_puts[key] = i
        except clustorage.ClustorageError as exc:
            failures[type(exc).__name__] += 1
        shared = f"s{i}"
        patiently(lambda: node.get(shared, lambda: ran.append(shared) or i))
        if i % 4 == 0:
            name = f"f_{node.name.replace('-', '_')}_{i}"
            try:
                node.define(name, f"def {name}():\n    return {i}\n")
                acked_defs[name] = i
            except clustorage.ClustorageError as exc:
                failures[type(exc).__name__] += 1
        time.sleep(0.01)

worker = threading.Thread(target=storm, daemon=True)
worker.start()
"""

STOP = "stop.set(); worker.join(90); [acked_puts, acked_defs, ran, dict(failures)]"


def _storm(members: list[Member]) -> None:
    for member in members:
        member.ok("import collections\n" + STORM)


def _converged(member: Member, puts: dict[str, int], defs: dict[str, int]) -> None:
    """``member`` holds every acknowledged value and function (in its replica: no fetch)."""
    check = (
        f"puts, defs = {json.dumps(puts)}, {json.dumps(defs)}\n"
        "held = set(node.keys()); functions = set(node.functions())\n"
        "[sorted(k for k in puts if k not in held), sorted(f for f in defs if f not in "
        "functions)]"
    )
    deadline = time.monotonic() + 30
    while True:
        missing = member.ok(check)
        if missing == [[], []]:
            break
        assert time.monotonic() < deadline, f"{member.name} misses {missing}"
        time.sleep(0.2)
    wrong = member.ok(
        f"puts, defs = {json.dumps(puts)}, {json.dumps(defs)}\n"
        "[k for k, v in puts.items() if node.get(k) != v] + "
        "[f for f, v in defs.items() if node.call(f) != v]"
    )
    assert wrong == [], f"{member.name} has other values for {wrong}"


# Five takeovers, as the issue asks, then a standby killed and restarted.
ROUNDS = 5


@pytest.mark.timeout(120)
def test_kill_9_of_the_active_loader_during_a_storm_loses_nothing(ha: HACluster) -> None:
    """kill -9 of the active loader, five times during a storm from 4 members: every
    acknowledged write is on every node, and each shared key's fn ran exactly once."""
    members = [ha.member(f"m{i}") for i in range(4)]
    _storm(members)
    epoch, active = ha.wait_leader()
    for _ in range(ROUNDS):
        time.sleep(1.0)
        os.kill(ha.loaders[active].pid, signal.SIGKILL)
        ha.loaders[active].wait(5)
        epoch, now = ha.wait_leader(after=epoch)
        assert now != active
        ha.start_on(active)  # back, as a standby
        active = now
    time.sleep(0.5)
    standby = next(port for port in ha.ports if port != active)
    os.kill(ha.loaders[standby].pid, signal.SIGKILL)  # a standby killed and restarted
    ha.loaders[standby].wait(5)
    ha.start_on(standby)
    time.sleep(1.0)
    assert ha.leader() == (epoch, active)  # the standby's death changed nothing
    puts: dict[str, int] = {}
    defs: dict[str, int] = {}
    computed: collections.Counter[str] = collections.Counter()
    for member in members:
        member_puts, member_defs, ran, _failures = member.ok(STOP)
        puts.update(member_puts)
        defs.update(member_defs)
        computed.update(ran)
    assert len(puts) > 50 and defs
    assert {key for key, count in computed.items() if count > 1} == set()
    late = ha.member("late")  # a late joiner resyncs from the active loader
    for member in [*members, late]:
        _converged(member, puts, defs)


@pytest.mark.timeout(60)
def test_a_standby_sends_members_to_the_active_loader(ha: HACluster) -> None:
    """A member that lists the standby first is told where the active one is, and joins it;
    ``clustorage status`` names the active loader and the standby; ``history`` asks the
    active one."""
    _, active = ha.wait_leader()
    standby = next(port for port in ha.ports if port != active)
    member = ha.member("m1", f"app1@127.0.0.1:{standby},127.0.0.1:{active}")
    assert member.ok("node.put('k', 1)") == 1
    done = subprocess.run(
        [sys.executable, "-m", "clustorage", "status", "--loader", ha.loader, "--json"],
        env=ha.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    loaders = {entry["address"]: entry["role"] for entry in json.loads(done.stdout)["loaders"]}
    assert loaders == {f"127.0.0.1:{active}": "active", f"127.0.0.1:{standby}": "standby"}
    text = subprocess.run(
        [sys.executable, "-m", "clustorage", "status", "--loader", ha.loader],
        env=ha.env,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert f"127.0.0.1:{standby}" in text and "standby" in text and "active" in text
    member.ok("node.define('f', 'def f():\\n    return 1\\n')")
    listed = f"app1@127.0.0.1:{standby},127.0.0.1:{active}"
    done = subprocess.run(
        [sys.executable, "-m", "clustorage", "history", "f", "--loader", listed, "--json"],
        env=ha.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert [row["version"] for row in json.loads(done.stdout)] == [1]


@pytest.mark.timeout(60)
def test_a_former_active_cannot_write_after_a_takeover(pg_url: str) -> None:
    """The fencing token: once another loader took the lock, the former active's writes
    fail inside their transaction and store nothing."""
    from clustorage.leadership import Leadership
    from clustorage.pgstore import PostgresStore

    first, second = PostgresStore(pg_url, "app1"), PostgresStore(pg_url, "app1")
    lock1, lock2 = Leadership(pg_url, "app1", 2), Leadership(pg_url, "app1", 2)
    try:
        first.epoch = lock1.acquire("a:1")
        assert first.epoch == 1 and lock2.acquire("b:2") is None
        assert lock2.active() == "a:1"
        first.commit(Entry(VALUE, "k", 1, b"one", None, "m", 1.0))
        lock1.drop()  # its session ends (as when its host is cut off): the lock is free
        deadline = time.monotonic() + 10
        while (epoch := lock2.acquire("b:2")) is None:  # once the server ended the session
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second.epoch = epoch
        assert second.epoch == 2
        with pytest.raises(StoreError, match="another loader of app1 took over"):
            first.commit(Entry(VALUE, "k", 2, b"two", None, "m", 2.0), previous=1)
        assert [e.version for e in second.history(VALUE, "k")] == [1]
        second.commit(Entry(VALUE, "k", 2, b"two", None, "m", 2.0), previous=1)
        assert [bytes(e.payload) for e in second.current()] == [b"two"]
    finally:
        for closing in (lock1, lock2):
            closing.drop()
        first.close()
        second.close()


@pytest.mark.timeout(120)
def test_postgresql_restarted_loses_no_acknowledged_write(tmp_path: Path) -> None:
    """PostgreSQL itself restarted: a loader takes the lock again, members reconnect, and
    every write acknowledged before is still there."""
    server = PostgresServer()
    cluster = HACluster(tmp_path, server.database())
    try:
        for port in cluster.ports:
            cluster.start_on(port)
        epoch, _ = cluster.wait_leader()
        member = cluster.member("m1")
        for i in range(20):
            member.ok(f"node.put('k{i}', {i})")
        member.ok("node.define('f', 'def f():\\n    return 7\\n')")
        server.stop()
        server.start()
        epoch, _ = cluster.wait_leader(after=epoch)
        deadline = time.monotonic() + 30
        while "ok" not in (answer := member.send("node.put('after', 1)")):
            assert time.monotonic() < deadline, answer
            time.sleep(0.2)
        assert member.ok("[node.get(f'k{i}') for i in range(20)]") == list(range(20))
        late = cluster.member("late")
        assert late.ok("[node.get(f'k{i}') for i in range(20)] + [node.call('f')]") == [
            *range(20),
            7,
        ]
    finally:
        cluster.close()
        server.close()


def test_an_invalid_store_is_refused_with_what_to_use(tmp_path: Path) -> None:
    """--store that is not a PostgreSQL URL is refused, naming the form to use."""
    done = subprocess.run(
        loader_argv("app1", f"127.0.0.1:{free_port()}", "--store", "mysql://x"),
        env=dict(os.environ, HOME=str(tmp_path), CLUSTORAGE_COOKIE="c" * 20),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "postgresql://USER@HOST/DB" in done.stderr


def test_a_loader_address_lists_the_active_loader_and_its_standbys() -> None:
    """--loader NAME@HOST:PORT,HOST:PORT parses to every address, in order, and prints back."""
    from clustorage.config import LoaderAddress, NodeConfig, parse_loader

    address = parse_loader("app1@hostA:4370,hostB,[::1]:4371")
    assert address.addresses == (("hostA", 4370), ("hostB", 4370), ("::1", 4371))
    assert str(address) == "app1@hostA:4370,hostB:4370,[::1]:4371"
    assert parse_loader("app1@h:1") == LoaderAddress("app1", "h", 1)
    config = NodeConfig.resolve(
        name="m", env={"CLUSTORAGE_LOADER": "app1@a:1,b:2", "CLUSTORAGE_COOKIE": "c"}
    )
    assert config.loader is not None and config.loader.addresses == (("a", 1), ("b", 2))
    stored = NodeConfig.resolve(
        name="app1", env={"CLUSTORAGE_STORE": "postgresql://db/x", "CLUSTORAGE_COOKIE": "c"}
    )
    assert stored.store == "postgresql://db/x"


class LoaderHosts:
    """Two namespaces, a loader host each, linked to this one (PostgreSQL, members) by veth
    pairs: 10.251.N.1 here, 10.251.N.2 there."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.names = [f"clh{tag}a", f"clh{tag}b"]
        self.made: list[str] = []

    def address(self, index: int) -> str:
        return f"10.251.{index + 1}.2"

    def create(self) -> None:
        # A run killed before its clean-up leaves its namespaces, and their veths here hold
        # the addresses these need.
        for line in _ip("netns", "list").stdout.splitlines():
            stale = line.split(" ")[0]
            if stale.startswith("clh") and stale not in self.names:
                _ip("netns", "del", stale)
        for index, ns in enumerate(self.names):
            result = _ip("netns", "add", ns)
            if result.returncode != 0:
                raise OSError(result.stderr.strip())
            self.made.append(ns)
            here, there = f"vh{ns[-7:]}", f"vt{ns[-7:]}"
            net = f"10.251.{index + 1}"
            for args in (
                ("link", "add", here, "type", "veth", "peer", there, "netns", ns),
                ("addr", "add", f"{net}.1/30", "dev", here),
                ("link", "set", here, "up"),
                ("-n", ns, "addr", "add", f"{net}.2/30", "dev", there),
                ("-n", ns, "link", "set", there, "up"),
                ("-n", ns, "link", "set", "lo", "up"),
            ):
                result = _ip(*args)
                if result.returncode != 0:
                    raise OSError(result.stderr.strip())

    def cut(self, index: int, up: bool) -> None:
        ns = self.names[index]
        result = _ip("-n", ns, "link", "set", f"vt{ns[-7:]}", "up" if up else "down")
        assert result.returncode == 0, result.stderr

    def destroy(self) -> None:
        for ns in self.made:  # its veth pair goes with it
            _ip("netns", "del", ns)


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


@pytest.fixture
def loader_hosts() -> Any:
    """Network namespaces for two loader hosts, removed after the test."""
    with namespaces(LoaderHosts()) as made:
        yield made


PARTITIONED = r"""
import threading, time
acked, refused = {}, collections.Counter()
stop = threading.Event()

def puts():
    i = 0
    while not stop.is_set():
        i += 1
        try:
            node.put(f"cut{i}", i)
            acked[f"cut{i}"] = time.time()
        except clustorage.ClustorageError as exc:
            refused[type(exc).__name__] += 1
        time.sleep(0.02)

worker = threading.Thread(target=puts, daemon=True)
worker.start()
"""


@pytest.mark.timeout(120)
def test_a_partitioned_active_loader_acknowledges_nothing_after_losing_its_lock(
    tmp_path: Path, loader_hosts: LoaderHosts
) -> None:
    """The active loader's host is cut off: the standby takes over within dead_after, the
    former active (still serving a member on its own host) stores and acknowledges
    nothing from then on, and every write it acknowledged before is kept."""
    server = PostgresServer(listen="127.0.0.1,10.251.1.1,10.251.2.1", trusted="10.251.0.0/16")
    url = server.database()
    cluster = HACluster(tmp_path, url)
    port = 4370
    try:
        for index, ns in enumerate(loader_hosts.names):
            log = open(tmp_path / f"loader-{index}.log", "w")  # noqa: SIM115
            remote = url.replace("127.0.0.1", f"10.251.{index + 1}.1")
            proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    *loader_argv(
                        "app1", f"{loader_hosts.address(index)}:{port}", "--store", remote
                    ),
                ],
                env=cluster.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            cluster.procs.append(proc)
            if index == 0:
                epoch, _ = cluster.wait_leader()
        listed = ",".join(f"{loader_hosts.address(i)}:{port}" for i in range(2))
        outside = cluster.member("outside", f"app1@{listed}")
        inside = cluster.member(
            "inside",
            f"app1@{loader_hosts.address(0)}:{port}",
            ("ip", "netns", "exec", loader_hosts.names[0]),
        )
        assert inside.ok("node.put('before', 1)") == 1
        inside.ok("import collections\n" + PARTITIONED)
        time.sleep(0.5)
        loader_hosts.cut(0, up=False)
        cut_at = time.time()
        epoch, _ = cluster.wait_leader(after=epoch, timeout=30)
        taken_at = cluster.since()
        deadline = time.monotonic() + 30
        while "ok" not in (answer := outside.send("node.put('after', 2)")):
            assert time.monotonic() < deadline, answer
            time.sleep(0.2)
        time.sleep(1.0)
        acked, refused = inside.ok("stop.set(); worker.join(30); [acked, dict(refused)]")
        late = [key for key, when in acked.items() if when >= taken_at]
        assert late == [], f"the former active acknowledged {late} after the takeover"
        assert refused, "the partitioned member's puts should have failed"
        assert (tmp_path / "loader-0.log").read_text().count("lost its lock") >= 1
        assert taken_at - cut_at < 2 * float(DEAD_AFTER) + 5
        loader_hosts.cut(0, up=True)
        check = outside.ok(
            f"keys = {json.dumps(sorted(acked))}\n[k for k in keys if node.get(k) is None]"
        )
        assert check == []
        assert outside.ok("[node.get('before'), node.get('after')]") == [1, 2]
    finally:
        cluster.close()
        server.close()


@pytest.mark.timeout(60)
def test_with_no_active_loader_a_write_names_every_listed_address(ha: HACluster) -> None:
    """Every listed loader gone: a put raises LoaderUnavailable naming both addresses."""
    member = ha.member("m1")
    assert member.ok("node.put('k', 1)") == 1
    for proc in ha.loaders.values():
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
    answer = member.send("node.put('k', 2)")
    assert answer.get("error") == "LoaderUnavailable", answer
    assert ha.loader in answer["message"]
    assert member.ok("node.get('k')") == 1  # what it holds still reads


def test_only_safe_requests_are_sent_again_after_a_takeover() -> None:
    """Reads, unforced definitions and commits are retried once; puts, deletes and a miss
    asking for the lease are not (they raise LoaderUnavailable)."""
    from clustorage.member import _retryable
    from clustorage.messages import FUNCTION, Commit, Define, Delete, Fetch, History, Put, Status

    assert _retryable(Fetch(1, VALUE, "k", False, ()))
    assert not _retryable(Fetch(1, VALUE, "k", True, ()))
    assert _retryable(Status(1)) and _retryable(History(1, FUNCTION, "f"))
    assert _retryable(Define(1, "f", "def f(): pass", False))
    assert not _retryable(Define(1, "f", "def f(): pass", True))
    assert _retryable(Commit(1, "k", 7, b"v"))
    assert not _retryable(Put(1, "k", b"v")) and not _retryable(Delete(1, VALUE, "k"))


def test_a_kernelspec_names_a_loader_and_its_standbys() -> None:
    """--loader NAME@A,B goes into the kernelspec as written, and a kernel parses it."""
    from clustorage.config import parse_loader
    from clustorage.kernel import get_kernel_dict

    spec = get_kernel_dict(loader="app1@hostA:4370,hostB:4370")
    assert spec["env"]["CLUSTORAGE_LOADER"] == "app1@hostA:4370,hostB:4370"
    assert parse_loader(spec["env"]["CLUSTORAGE_LOADER"]).addresses == (
        ("hostA", 4370),
        ("hostB", 4370),
    )


@pytest.mark.timeout(120)
def test_the_ha_bench_runs(pg_url: str) -> None:
    """bench/ha.py --quick runs against a database and prints both figures."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(root / "bench" / "ha.py"), "--quick", "--store", pg_url],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "PostgreSQL" in done.stdout and "SQLite" in done.stdout
    assert "takeover, 2 kill -9" in done.stdout


READS = r"""
import threading
reads, failed = [0], []
stop = threading.Event()

def loop():
    while not stop.is_set():
        try:
            node.history('k', 'value')
            reads[0] += 1
        except clustorage.ClustorageError as exc:
            failed.append(repr(exc))

worker = threading.Thread(target=loop, daemon=True)
worker.start()
"""


@pytest.mark.timeout(60)
def test_reads_in_flight_during_a_takeover_are_sent_again(ha: HACluster) -> None:
    """A member reading in a loop while the active loader is killed sees no error: the read
    cut off by the kill goes again to the loader that took over."""
    member = ha.member("m1")
    member.ok("node.put('k', 1)")
    member.ok(READS)
    epoch, active = ha.wait_leader()
    time.sleep(0.5)
    os.kill(ha.loaders[active].pid, signal.SIGKILL)
    ha.loaders[active].wait(5)
    ha.wait_leader(after=epoch)
    before = member.ok("reads[0]")
    deadline = time.monotonic() + 20
    while member.ok("reads[0]") < before + 20:  # reading from the new active loader
        assert time.monotonic() < deadline
        time.sleep(0.1)
    reads, failed = member.ok("stop.set(); worker.join(20); [reads[0], failed]")
    assert failed == [] and reads > 20
