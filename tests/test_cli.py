"""The clustorage command: status and history for scripts, loader start-up errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import Cluster

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
