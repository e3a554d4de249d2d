"""Shared fixtures: free ports, isolated homes, real loader and member processes, and TLS
certificates."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

import clustorage
from clustorage import tls

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
COOKIE = "test-cookie-not-secret"
LOADER = [sys.executable, "-m", "clustorage", "loader"]


def loader_argv(name: str, listen: str, *options: str) -> list[str]:
    """``clustorage loader --name NAME --listen LISTEN OPTIONS...`` in this Python."""
    return [*LOADER, "--name", name, "--listen", listen, *options]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, deadline: float, proc: subprocess.Popen[Any] | None = None) -> None:
    """Block until something accepts connections on ``port``."""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def kill(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """Stop ``proc`` by PID: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def stop_process(pid: int, timeout: float = 10) -> None:
    """SIGSTOP ``pid`` and return once every thread of it is stopped (the signal takes
    effect when each thread next runs, not when kill returns)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                states.append((task / "stat").read_text().rpartition(")")[2].split()[0])
        if states and all(state in "Tt" for state in states):
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not stop within {timeout}s")


class Member:
    """A node in its own process (tests/driver.py), evaluating what the test sends."""

    def __init__(
        self,
        env: dict[str, str],
        name: str,
        loader: str | None,
        prefix: tuple[str, ...] = (),
        *,
        log: Path,
    ) -> None:
        """``log``: the file its log goes to, kept for a failed test's post-mortem (not a
        pipe, which nobody reads as it runs: a chatty member would fill it and block)."""
        env = dict(env, CLUSTORAGE_NAME=name)
        if loader is not None:
            env["CLUSTORAGE_LOADER"] = loader
        self.name = name
        self.log = log
        with open(log, "a") as stderr:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, str(TESTS / "driver.py")],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                bufsize=1,
            )
        self.started = self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} died: {self.log.read_text()[-3000:]}")
        return json.loads(line)  # type: ignore[no-any-return]

    def send(self, source: str) -> dict[str, Any]:
        """Run ``source`` in the member; its answer (``ok`` or ``error``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(source) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def start_send(self, source: str) -> None:
        """Send ``source`` without waiting; collect the answer later with :meth:`answer`."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(source) + "\n")
        self.proc.stdin.flush()

    answer = _answer

    def ok(self, source: str) -> Any:
        """Run ``source`` and return its value; fail the test on an error."""
        answer = self.send(source)
        assert "ok" in answer, answer
        return answer["ok"]


class Cluster:
    """Processes a test started, all killed by PID when it ends."""

    def __init__(self, tmp_path: Path) -> None:
        home = tmp_path / "home"
        home.mkdir()
        self.tmp = tmp_path
        self.env = dict(
            os.environ,
            HOME=str(home),
            CLUSTORAGE_COOKIE=COOKIE,
            PYTHONUNBUFFERED="1",
            CLUSTORAGE_TIMEOUT="5",
        )
        for name in (
            "CLUSTORAGE_NAME",
            "CLUSTORAGE_LOADER",
            "CLUSTORAGE_LISTEN",
            "CLUSTORAGE_DATA",
        ):
            self.env.pop(name, None)
        self.procs: list[subprocess.Popen[Any]] = []
        self.port = 0
        self.loader_name = "app1"

    @property
    def loader(self) -> str:
        return f"{self.loader_name}@127.0.0.1:{self.port}"

    def start_loader(
        self, name: str = "app1", data: str = ":memory:", port: int | None = None
    ) -> subprocess.Popen[Any]:
        """A real ``clustorage loader`` process; returns once it accepts connections."""
        self.port = port or self.port or free_port()
        self.loader_name = name
        log = open(self.tmp / f"loader-{name}.log", "a")  # noqa: SIM115
        proc = subprocess.Popen(
            loader_argv(name, f"127.0.0.1:{self.port}", "--data", data),
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        wait_for_port(self.port, time.monotonic() + 30, proc)
        return proc

    def loader_log(self, name: str = "app1") -> str:
        return (self.tmp / f"loader-{name}.log").read_text()

    def log_of(self, member: str) -> Path:
        """Where a member process of this cluster logs."""
        return self.tmp / f"member-{member}.log"

    def member(self, name: str, loader: str | None = None, prefix: tuple[str, ...] = ()) -> Member:
        """A member process connected to this cluster's loader (run under ``prefix``)."""
        member = Member(self.env, name, loader or self.loader, prefix, log=self.log_of(name))
        self.procs.append(member.proc)
        return member

    def close(self) -> None:
        for proc in reversed(self.procs):
            kill(proc)


LOG_TAIL = 6000  # characters of each process's log shown beside a failure


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that started processes shows the end of each one's log: a flake in CI
    leaves its post-mortem in the output, since pytest removes the files afterwards."""
    report: pytest.TestReport = yield
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and isinstance(tmp, Path):
        for log in sorted(tmp.glob("*.log")):
            text = log.read_text(errors="replace")
            report.sections.append((f"{log.name} ({call.when}, last lines)", text[-LOG_TAIL:]))
    return report


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Real processes on 127.0.0.1, killed by PID at the end of the test."""
    cluster = Cluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.close()


@contextlib.contextmanager
def node_pair(**loader_options: Any) -> Iterator[tuple[clustorage.Node, clustorage.Node]]:
    """An in-process loader ``l`` and a member ``m`` connected to it."""
    options: dict[str, Any] = {"listen": "127.0.0.1:0", "data": ":memory:", **loader_options}
    with clustorage.Node("l", cookie=COOKIE, **options) as loader:
        address = f"l@127.0.0.1:{loader.address[1]}"
        with clustorage.Node("m", address, cookie=COOKIE) as member:
            yield loader, member


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated HOME (and so ~/.clustorage) for in-process nodes."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("HOME", str(path))
    monkeypatch.setenv("CLUSTORAGE_COOKIE", COOKIE)
    for name in ("CLUSTORAGE_NAME", "CLUSTORAGE_LOADER", "CLUSTORAGE_LISTEN", "CLUSTORAGE_DATA"):
        monkeypatch.delenv(name, raising=False)
    return path


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A private PostgreSQL server for the session (skips where none can run)."""
    from tests.pg_helpers import postgres_server

    with postgres_server() as server:
        yield server


@pytest.fixture
def pg_url(postgres: Any) -> str:
    """The URL of a fresh, empty PostgreSQL database."""
    return str(postgres.database())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and certificates for "loader" and "member" (``clustorage.init_tls``), once per
    test module; the tests that use it are skipped without ``cryptography``."""
    pytest.importorskip("cryptography")
    folder = tmp_path_factory.mktemp("tls")
    clustorage.init_tls(folder, ["loader", "member"], [])
    return folder


def server_context(certs: Path, name: str = "loader") -> ssl.SSLContext:
    return tls.server_context(
        tls.TLSFiles(
            str(certs / f"{name}.pem"), str(certs / f"{name}-key.pem"), str(certs / "ca.pem")
        )
    )


def client_context(certs: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(certs / "ca.pem")
    context.load_cert_chain(certs / "member.pem", certs / "member-key.pem")
    return context
