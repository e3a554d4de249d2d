"""The clustorage command: status and history for scripts, loader start-up errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LOADER, Cluster, free_port, kill, wait_for_port

pytestmark = pytest.mark.timeout(60)


def clustorage(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clustorage", *args],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_status_json_lists_nodes_keys_and_functions(cluster: Cluster) -> None:
    """`clustorage status --json` shows the loader, its members and the entry counts."""
    cluster.start_loader()
    member = cluster.member("worker")
    member.ok("node.put('a', 1)\nnode.define('f', 'lambda: 1')")
    result = clustorage(cluster, "status", "--loader", cluster.loader, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # a normal run logs nothing
    status = json.loads(result.stdout)
    assert status["cluster"]["keys"] == 1
    assert status["cluster"]["functions"] == 1
    assert [(n["name"], n["role"]) for n in status["nodes"]] == [
        ("app1", "loader"),
        ("worker", "member"),
    ]
    text = clustorage(cluster, "status", "--loader", cluster.loader)
    assert "worker" in text.stdout and "functions 1" in text.stdout


def test_history_prints_every_version(cluster: Cluster) -> None:
    """`clustorage history NAME` prints each version with its source and author."""
    cluster.start_loader()
    member = cluster.member("dev")
    member.ok("node.define('f', 'lambda: 1')\nnode.define('f', 'lambda: 2')")
    result = clustorage(cluster, "history", "f", "--loader", cluster.loader)
    assert result.returncode == 0, result.stderr
    assert "v1" in result.stdout and "v2" in result.stdout
    assert "by dev" in result.stdout and "lambda: 2" in result.stdout


def test_status_without_a_loader_fails_clearly(cluster: Cluster) -> None:
    """status against a loader that is not there exits non-zero and says so."""
    cluster.port = 1
    result = clustorage(cluster, "status", "--loader", "nobody@127.0.0.1:1", "--timeout", "1")
    assert result.returncode != 0
    assert "cannot reach the loader nobody@127.0.0.1:1" in result.stderr


def test_loader_stops_cleanly_on_sigterm_and_sigint(cluster: Cluster) -> None:
    """A headless loader exits 0 on SIGTERM and on SIGINT."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        proc = cluster.start_loader()
        os.kill(proc.pid, signum)
        assert proc.wait(20) == 0
        cluster.port = 0


def test_group_readable_cookie_file_is_refused(cluster: Cluster) -> None:
    """A cookie file others can read is refused with the chmod that fixes it."""
    cookie = cluster.tmp / "cookie"
    cookie.write_text("secret\n")
    cookie.chmod(0o644)
    result = clustorage(cluster, "loader", "--name", "l", "--cookie-file", str(cookie))
    assert result.returncode == 2
    assert f"chmod 600 {cookie}" in result.stderr


def test_second_loader_on_a_taken_port_says_so(cluster: Cluster) -> None:
    """A loader whose address is taken exits 2, naming the address and --listen."""
    cluster.start_loader()
    result = clustorage(
        cluster, "loader", "--name", "again", "--listen", f"127.0.0.1:{cluster.port}"
    )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{cluster.port}" in result.stderr
    assert "--listen HOST:PORT" in result.stderr


def files_under(path: Path) -> list[Path]:
    """Every file below ``path`` (none if it does not exist)."""
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.mark.parametrize("command", [["status"], ["history", "sum"], ["status", "--json"]])
def test_status_and_history_without_a_loader_say_how_and_start_nothing(
    cluster: Cluster, command: list[str]
) -> None:
    """Without --loader, status and history exit 2 naming --loader; no file is created."""
    result = clustorage(cluster, *command)
    assert result.returncode == 2
    assert "--loader NAME[@HOST[:PORT]]" in result.stderr
    assert "$CLUSTORAGE_LOADER" in result.stderr
    assert result.stdout == ""
    assert files_under(cluster.tmp / "home") == []


def test_status_does_not_join_the_cluster(cluster: Cluster) -> None:
    """A status probe is not a node: the loader logs no join, other nodes see no Members."""
    cluster.start_loader()
    member = cluster.member("watcher")
    for _ in range(3):
        result = clustorage(cluster, "status", "--loader", cluster.loader, "--json")
        assert result.returncode == 0, result.stderr
        names = [node["name"] for node in json.loads(result.stdout)["nodes"]]
        assert names == ["app1", "watcher"]
    assert member.ok("node.nodes()") == ["app1", "watcher"]
    log = cluster.loader_log()
    assert "joined" in log and "probe" not in log


def test_loader_requires_a_name(cluster: Cluster) -> None:
    """`clustorage loader` without --name (or $CLUSTORAGE_NAME) exits 2 and says why."""
    result = clustorage(cluster, "loader", "--listen", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "--name NAME" in result.stderr and "same store" in result.stderr
    assert files_under(cluster.tmp / "home") == []


def test_loader_restarted_with_its_name_opens_the_same_store(cluster: Cluster) -> None:
    """A loader restarted under the same name and --data keeps what was stored."""
    data = str(cluster.tmp / "data")
    loader = cluster.start_loader(data=data)
    member = cluster.member("writer")
    member.ok("node.put('kept', 42)")
    kill(loader)
    cluster.start_loader(data=data)
    assert member.ok("node.get('kept')") == 42
    result = clustorage(cluster, "status", "--loader", cluster.loader, "--json")
    assert json.loads(result.stdout)["cluster"]["keys"] == 1


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("nonsense", "--listen 'nonsense': cannot resolve host 'nonsense'"),
        ("127.0.0.1:http", "--listen: invalid listen address '127.0.0.1:http'"),
        ("192.0.2.123:4370", "--listen: cannot listen on 192.0.2.123:4370"),
    ],
)
def test_bad_listen_names_the_flag_and_creates_no_store(
    cluster: Cluster, listen: str, expected: str
) -> None:
    """A --listen the loader cannot use exits 2 naming --listen, before any store exists."""
    data = cluster.tmp / "data"
    result = clustorage(
        cluster, "loader", "--name", "app1", "--listen", listen, "--data", str(data)
    )
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert files_under(data) == [] and files_under(cluster.tmp / "home") == []


def test_wildcard_listen_tells_members_a_usable_address(cluster: Cluster) -> None:
    """A loader on 0.0.0.0 logs a member hint with the host's name, never 0.0.0.0."""
    port = free_port()
    log = cluster.tmp / "wildcard.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*LOADER, "--name", "app1", "--listen", f"0.0.0.0:{port}", "--data", ":memory:"],
            env=cluster.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    cluster.procs.append(proc)
    wait_for_port(port, time.monotonic() + 30, proc)
    deadline = time.monotonic() + 30  # it logs once it listens: a moment after the port opens
    while "ready on" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    ready = next(line for line in log.read_text().splitlines() if "ready on" in line)
    hint = ready.partition("members: ")[2]
    assert f"--loader app1@{socket.gethostname()}:{port}" in hint
    assert "0.0.0.0" not in hint
    host = hint.split(" or ")[-1].partition("@")[2].rpartition(":")[0]
    cluster.port = port
    result = clustorage(cluster, "status", "--loader", f"app1@{host}:{port}")
    assert result.returncode == 0, result.stderr


# Runs the command from a small interpreter: a child forked straight from the test process
# would count the test process's own memory in its peak (ru_maxrss survives exec).
_MEASURE = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE)
out = proc.stdout.read().decode()
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, out]))
"""


def peak_rss(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``argv``; its peak resident memory in bytes (from wait4), and what it printed."""
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, *argv], env=env, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    code, rss, out = json.loads(done.stdout)
    assert code == 0, out
    return int(rss), str(out)


@pytest.mark.timeout(240)
def test_status_of_a_200mb_store_stays_small(cluster: Cluster) -> None:
    """`clustorage status` on a 200 MB store downloads none of it: its memory stays small."""
    cluster.start_loader(data=str(cluster.tmp / "data"))
    writer = cluster.member("writer")
    for index in range(4):
        writer.ok(f"node.put('big{index}', bytes(50_000_000))")
    writer.ok("node.put('small', 1)")
    argv = [sys.executable, "-m", "clustorage", "status", "--loader", cluster.loader, "--json"]
    rss, out = peak_rss(argv, cluster.env)
    status: dict[str, Any] = json.loads(out)
    assert status["cluster"]["keys"] == 5
    assert rss < 120 * 2**20, f"status peaked at {rss / 2**20:.0f} MB"
