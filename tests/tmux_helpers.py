"""Drive real terminal programs in a private tmux server, as a user at a keyboard would.

Every :class:`Tmux` runs its own server (``tmux -L <unique socket>``), so tests never touch
a user's tmux; :meth:`Tmux.close` kills every pane's process by PID and then the server.
Screens are read with ``capture-pane`` and polled up to a deadline, never slept on.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

__all__ = ["SESSION", "Tmux", "require_tmux", "shell_command"]

SESSION = "test"
WIDTH, HEIGHT = 140, 40


def require_tmux() -> str:
    """The tmux executable, or skip the test when there is none."""
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux is not installed (scripts/bootstrap.sh installs it)")
    return tmux


def shell_command(name: str, *flags: str) -> list[str]:
    """``clustorage-shell --name NAME FLAGS...`` run by this test's Python."""
    return [sys.executable, "-m", "clustorage.shell", "--name", name, *flags]


class Tmux:
    """A private tmux server with one window per program.

    Args:
        env: the environment of every program (HOME included).
        socket: the ``-L`` socket name (default: unique to this process and call).
        session: the session whose windows are named (default ``test``, made here).
    """

    def __init__(
        self, env: Mapping[str, str], socket: str | None = None, session: str = SESSION
    ) -> None:
        self.session = session
        self.tmux = require_tmux()
        self.socket = socket or f"clustorage-test-{os.getpid()}-{secrets.token_hex(4)}"
        self.env = {k: v for k, v in env.items() if k not in ("TMUX", "TMUX_PANE")}
        self._started = False
        self._state = tempfile.TemporaryDirectory(prefix="clustorage-tmux-")

    # -- plumbing --------------------------------------------------------------------------

    def run(self, *args: str, check: bool = True) -> str:
        """Run one tmux command against this server; its stdout."""
        done = subprocess.run(
            [self.tmux, "-L", self.socket, "-f", os.devnull, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def start_server(self) -> None:
        """Start the server with an idle window, keeping dead panes to read exit codes."""
        if self._started:
            return
        size = ["-x", str(WIDTH), "-y", str(HEIGHT)]
        self.run("new-session", "-d", "-s", self.session, "-n", "idle", *size, "cat")
        self._started = True
        self.run("set-option", "-g", "remain-on-exit", "on")
        self.run("set-option", "-g", "default-size", f"{WIDTH}x{HEIGHT}")
        self.run("set-option", "-g", "history-limit", "5000")

    def target(self, window: str) -> str:
        return f"={self.session}:{window}"

    # -- windows ---------------------------------------------------------------------------

    def spawn(self, window: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
        """Run ``argv`` in a new window named ``window``; returns the window's process id.

        A small ``sh`` runs ``argv`` and records its exit status for :meth:`wait_exit`
        (tmux itself may report a dead pane before it has reaped the process).
        """
        self.start_server()
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        status = self._status_file(window)
        status.unlink(missing_ok=True)
        extra.append(f"STATUS_FILE={status}")
        record = '"$@"; echo $? >"$STATUS_FILE.tmp"; mv "$STATUS_FILE.tmp" "$STATUS_FILE"'
        command = shlex.join(["exec", "env", *extra, "sh", "-c", record, "sh", *argv])
        self.run("new-window", "-d", "-t", f"={self.session}:", "-n", window, command)
        return self.pid(window)

    def _status_file(self, window: str) -> Path:
        return Path(self._state.name) / f"{window}.status"

    def pid(self, window: str) -> int:
        return int(self.run("display-message", "-p", "-t", self.target(window), "#{pane_pid}"))

    def send(self, window: str, text: str = "", *keys: str) -> None:
        """Type ``text`` literally, then press ``keys`` (tmux key names: Enter, C-d, Tab)."""
        if text:
            self.run("send-keys", "-t", self.target(window), "-l", text)
        if keys:
            self.run("send-keys", "-t", self.target(window), *keys)

    def capture(self, window: str) -> str:
        """The window's screen (wrapped lines joined), trailing blank lines dropped."""
        return self.run("capture-pane", "-p", "-J", "-t", self.target(window)).rstrip("\n")

    def wait_for(
        self,
        window: str,
        expected: str | re.Pattern[str] | Callable[[str], bool],
        timeout: float = 20.0,
    ) -> str:
        """Poll the screen until ``expected`` (text, regex or predicate) shows; the screen."""
        if isinstance(expected, str):
            text = expected

            def check(screen: str) -> bool:
                return text in screen

        elif isinstance(expected, re.Pattern):
            pattern = expected

            def check(screen: str) -> bool:
                return pattern.search(screen) is not None

        else:
            check = expected
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.capture(window)
            if check(screen):
                return screen
            time.sleep(0.05)
        raise AssertionError(f"{expected!r} did not show in {window} in {timeout}s:\n{screen}")

    def toolbar(self, window: str) -> str:
        """The bottom line of the window (a clustorage-shell's toolbar)."""
        lines = self.capture(window).splitlines()
        return lines[-1] if lines else ""

    def wait_exit(self, window: str, timeout: float = 20.0) -> int:
        """Wait for the program of a :meth:`spawn`-ed window to end; its exit status."""
        status = self._status_file(window)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if status.exists():
                return int(status.read_text())
            time.sleep(0.05)
        raise AssertionError(f"{window} still runs after {timeout}s:\n{self.capture(window)}")

    def windows(self) -> list[str]:
        return self.run("list-windows", "-a", "-F", "#{window_name}").split()

    # -- the end ---------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every live pane's process group by id, then the server."""
        listed = self.run("list-panes", "-a", "-F", "#{pane_pid} #{pane_dead}", check=False)
        live = {int(p) for p, dead in (line.split() for line in listed.splitlines()) if dead == "0"}
        for pid in live:  # a pane's process leads its own session and process group
            _killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(_alive(pid) for pid in live):
            time.sleep(0.05)
        for pid in live:
            _killpg(pid, signal.SIGKILL)
        self.run("kill-server", check=False)
        # tmux leaves its socket file behind; it is ours alone, so remove it.
        tmpdir = Path(self.env.get("TMUX_TMPDIR") or "/tmp")
        (tmpdir / f"tmux-{os.getuid()}" / self.socket).unlink(missing_ok=True)
        self._state.cleanup()


def _killpg(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, to be reaped by tmux, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(") ", 1)[-1][:1] != "Z"
