"""How long clustorage-shell takes from launch to a usable prompt.

Each run starts ``python -m clustorage.shell`` in a fresh pseudo-terminal (answering its
cursor-position queries as a terminal would) and times from the launch until the prompt
``NAME> `` and the toolbar are drawn, i.e. until the node runs and typing works. Then it
presses Ctrl-D and times the exit as well. Two cases: a shell that is the loader, and a
member shell joining a running headless loader (``clustorage loader``).

    python bench/startup.py            # 5 runs of each case
    python bench/startup.py --quick    # 1 run of each, for the tests
    python bench/startup.py --json     # also print the figures as JSON
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

from benchlib import free_port, stop_process, wait_for_port

ROWS, COLS = 36, 120
COOKIE = "bench-cookie-not-secret"
CPR_QUERY = b"\x1b[6n"
ANSI = re.compile(
    rb"\x1b\[[0-9;?<>=]*[ -/]*[@-~]"  # CSI: colours, cursor moves, queries
    rb"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC: the window title
    rb"|\x1b[()][0-9A-Za-z]|\x1b[=>78]"  # charsets, keypad modes, cursor save/restore
)


class Terminal:
    """A program in a pseudo-terminal, with its screen output as plain text."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        self.master = master
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.raw = b""

    def read_until(self, done: re.Pattern[bytes], timeout: float) -> bool:
        """Read output (answering cursor queries) until ``done`` matches the plain text."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if not ready:
                if self.proc.poll() is not None:
                    return False
                continue
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the program closed the terminal
                return False
            self.raw += chunk
            for _ in range(chunk.count(CPR_QUERY)):
                os.write(self.master, f"\x1b[{ROWS - 1};1R".encode())
            if done.search(ANSI.sub(b"", self.raw)):
                return True
        return False

    def text(self) -> str:
        return ANSI.sub(b"", self.raw).decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        os.close(self.master)


def time_shell(name: str, flags: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Seconds from launch to a usable prompt, and from Ctrl-D to exit (status 0)."""
    argv = [sys.executable, "-m", "clustorage.shell", "--name", name, "--cookie", COOKIE, *flags]
    ready = re.compile(re.escape(f"{name}> ".encode()) + rb"[\s\S]*\| \d+ nodes? \|")
    start = time.perf_counter()
    term = Terminal(argv, env)
    try:
        if not term.read_until(ready, timeout=60):
            raise RuntimeError(f"{name} showed no prompt:\n{term.text()[-2000:]}")
        started = time.perf_counter() - start
        os.write(term.master, b"\x04")
        stop = time.perf_counter()
        term.read_until(re.compile(rb"left the cluster"), timeout=30)
        status = term.proc.wait(30)
        stopped = time.perf_counter() - stop
        if status != 0:
            raise RuntimeError(f"{name} exited with {status}:\n{term.text()[-2000:]}")
        return started, stopped
    finally:
        term.close()


def describe(label: str, figures: list[float]) -> str:
    return (
        f"  {label:<28} median {statistics.median(figures):6.3f} s   "
        f"min {min(figures):6.3f} s   max {max(figures):6.3f} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each case (default 5)")
    parser.add_argument("--quick", action="store_true", help="one run of each case")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    runs = 1 if args.quick else max(args.runs, 1)

    home = Path(tempfile.mkdtemp(prefix="clustorage-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTORAGE_")}
    env.update(HOME=str(home), TERM="xterm-256color", COLUMNS=str(COLS), LINES=str(ROWS))
    results: dict[str, dict[str, list[float]]] = {}
    loader_port = free_port()
    loader = subprocess.Popen(
        [
            *(sys.executable, "-m", "clustorage", "loader", "--name", "bench-loader"),
            *("--listen", f"127.0.0.1:{loader_port}", "--data", ":memory:", "--cookie", COOKIE),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(loader_port)
        cases = {
            "loader shell": lambda i: (
                f"solo{i}",
                ["--listen", f"127.0.0.1:{free_port()}", "--data", ":memory:"],
            ),
            "member shell (joining)": lambda i: (
                f"member{i}",
                ["--loader", f"bench-loader@127.0.0.1:{loader_port}"],
            ),
        }
        for label, case in cases.items():
            ready, leave = [], []
            for i in range(runs):
                name, flags = case(i)
                started, stopped = time_shell(name, flags, env)
                ready.append(started)
                leave.append(stopped)
            results[label] = {"ready": ready, "exit": leave}
    finally:
        stop_process(loader)
        shutil.rmtree(home, ignore_errors=True)

    print(f"clustorage-shell: launch to usable prompt ({runs} run(s) each, {COLS}x{ROWS} pty)")
    for label, figures in results.items():
        print(describe(label, figures["ready"]))
    print("Ctrl-D to exit (node stopped)")
    for label, figures in results.items():
        print(describe(label, figures["exit"]))
    if args.json:
        print(json.dumps({"runs": runs, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
