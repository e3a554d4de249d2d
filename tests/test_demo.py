"""demo/tmux.sh brings up the three-node demo, on its own tmux server and port for tests."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port
from tests.tmux_helpers import Tmux, require_tmux

pytestmark = pytest.mark.timeout(90)

DEMO = ROOT / "demo" / "tmux.sh"
CLI = [sys.executable, "-m", "clustorage"]


def _bottom_has(text: str) -> Callable[[str], bool]:
    def check(screen: str) -> bool:
        lines = screen.splitlines()
        return bool(lines) and text in lines[-1]

    return check


def test_demo_starts_three_nodes_that_see_each_other(tmp_path: Path) -> None:
    """tmux.sh starts app1 (loader), app2 and app3; a value got in app3 is known in app1."""
    require_tmux()
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLUSTORAGE_", "TMUX"))}
    env.update(
        HOME=str(home),
        CLUSTORAGE_DEMO_TMUX=f"clustorage-demo-test-{os.getpid()}",
        CLUSTORAGE_DEMO_PORT=str(free_port()),
        CLUSTORAGE_DEMO_DIR=str(tmp_path / "state" / "demo"),
    )
    tmux = Tmux(env, socket=env["CLUSTORAGE_DEMO_TMUX"], session="clustor")
    try:
        done = subprocess.run(
            ["bash", str(DEMO)],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            preexec_fn=lambda: os.umask(0o022),
        )
        assert done.returncode == 0, done.stderr
        assert f"tmux -L {env['CLUSTORAGE_DEMO_TMUX']} attach -t clustor" in done.stdout
        assert {"app1", "app2", "app3"} <= set(tmux.windows())
        cookie = tmp_path / "state" / "demo" / "cookie"
        assert stat.S_IMODE(cookie.stat().st_mode) == 0o600
        for made in (tmp_path / "state", tmp_path / "state" / "demo"):  # under umask 022
            assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
        for name in ("app1", "app2", "app3"):
            tmux.wait_for(name, _bottom_has("| 3 nodes |"))
        tmux.send("app3", "get('hello', lambda: 'world')", "Enter")
        tmux.wait_for("app3", "\n'world'\n")
        tmux.wait_for("app1", "[cluster] value 'hello' v1 loaded from app3")
        tmux.send("app1", "get('hello')", "Enter")
        tmux.wait_for("app1", "\n'world'\n")
    finally:
        tmux.run("kill-session", "-t", "clustor", check=False)
        tmux.close()


def demo_env(tmp_path: Path) -> dict[str, str]:
    """An environment running the demo on its own tmux server, port and state directory."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLUSTORAGE_", "TMUX"))}
    env.update(
        HOME=str(home),
        CLUSTORAGE_TIMEOUT="2",
        CLUSTORAGE_DEMO_TMUX=f"clustorage-demo-test-{os.getpid()}-{tmp_path.name}",
        CLUSTORAGE_DEMO_PORT=str(free_port()),
        CLUSTORAGE_DEMO_DIR=str(tmp_path / "demo"),
    )
    return env


def run_demo(env: dict[str, str], *args: str) -> str:
    """Run demo/tmux.sh detached; its output (the test fails if it exits non-zero)."""
    done = subprocess.run(
        ["bash", str(DEMO), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def wait_windows(tmux: Tmux, names: set[str], timeout: float = 20.0) -> None:
    """Wait until the demo's windows are exactly ``names``."""
    deadline = time.monotonic() + timeout
    while sorted(tmux.windows()) != sorted(names):
        assert time.monotonic() < deadline, tmux.windows()
        time.sleep(0.05)


@pytest.mark.timeout(150)
def test_demo_hint_restart_of_a_closed_window_and_reset(tmp_path: Path) -> None:
    """With app1 gone, app2's error names the demo's cookie and data; tmux.sh reopens only
    app1 and says so; --reset ends the session and deletes the demo's state."""
    require_tmux()
    env = demo_env(tmp_path)
    state = tmp_path / "demo"
    tmux = Tmux(env, socket=env["CLUSTORAGE_DEMO_TMUX"], session="clustor")
    try:
        assert "Started the demo" in run_demo(env)
        tmux.wait_for("app2", _bottom_has("| 3 nodes |"))
        # README: how `clustorage status` reaches the demo.
        loader = f"app1@127.0.0.1:{env['CLUSTORAGE_DEMO_PORT']}"
        status = subprocess.run(
            [*CLI, "status", "--loader", loader, "--cookie-file", str(state / "cookie")],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (status.returncode, status.stderr) == (0, "")
        assert "nodes     3" in status.stdout
        tmux.send("app1", "", "C-d")
        wait_windows(tmux, {"app2", "app3"})
        tmux.send("app2", "get('never_stored', lambda: 1)", "Enter")
        screen = tmux.wait_for("app2", "or check --loader")
        flat = screen.replace("\n", "")
        assert f"--cookie-file {state / 'cookie'}" in flat
        assert f"--data {state / 'data'}" in flat
        assert f"--listen 127.0.0.1:{env['CLUSTORAGE_DEMO_PORT']}" in flat

        assert "restarted window(s): app1." in run_demo(env)
        wait_windows(tmux, {"app1", "app2", "app3"})
        tmux.wait_for("app2", _bottom_has("| 3 nodes |"), timeout=30)
        assert "already runs" in run_demo(env)
        assert sorted(tmux.windows()) == ["app1", "app2", "app3"]

        out = run_demo(env, "--reset")
        assert "Ended tmux session 'clustor'" in out
        assert not state.exists()
        assert "clustor" not in tmux.run("list-sessions", check=False)
    finally:
        tmux.run("kill-session", "-t", "clustor", check=False)
        tmux.close()


@pytest.mark.timeout(150)
def test_demo_over_tls(tmp_path: Path) -> None:
    """tmux.sh --tls: certificates made in the demo's state, three nodes over TLS, and a
    status without them is told the loader speaks TLS."""
    require_tmux()
    pytest.importorskip("cryptography")
    env = demo_env(tmp_path)
    state = tmp_path / "demo"
    tmux = Tmux(env, socket=env["CLUSTORAGE_DEMO_TMUX"], session="clustor")
    try:
        assert "Started the demo" in run_demo(env, "--tls")
        for name in ("app1", "app2", "app3"):
            assert stat.S_IMODE((state / "tls" / f"{name}-key.pem").stat().st_mode) == 0o600
            tmux.wait_for(name, _bottom_has("| 3 nodes |"))
        tmux.send("app3", "get('hello', lambda: 'world')", "Enter")
        tmux.wait_for("app1", "[cluster] value 'hello' v1 loaded from app3")
        loader = f"app1@127.0.0.1:{env['CLUSTORAGE_DEMO_PORT']}"
        ask = [*CLI, "status", "--loader", loader, "--cookie-file", str(state / "cookie")]
        tls = ["--tls-cert", str(state / "tls" / "app2.pem")]
        tls += ["--tls-key", str(state / "tls" / "app2-key.pem")]
        tls += ["--tls-ca", str(state / "tls" / "ca.pem")]
        status = subprocess.run([*ask, *tls], env=env, capture_output=True, text=True, timeout=30)
        assert (status.returncode, status.stderr) == (0, "")
        assert "nodes     3" in status.stdout
        plain = subprocess.run(ask, env=env, capture_output=True, text=True, timeout=30)
        assert plain.returncode == 2 and "speaks TLS" in plain.stderr
    finally:
        tmux.run("kill-session", "-t", "clustor", check=False)
        tmux.close()
