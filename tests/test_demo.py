"""demo/tmux.sh brings up the three-node demo, on its own tmux server and port for tests."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port
from tests.tmux_helpers import Tmux, require_tmux

pytestmark = pytest.mark.timeout(90)

DEMO = ROOT / "demo" / "tmux.sh"


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
