"""The processes a bench run starts: JSON-line workers (``bench/worker.py``), loaders and
servers, each stopped by its PID when the run ends."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from benchlib import free_port

if TYPE_CHECKING:
    from harness import Bench

HERE = Path(__file__).resolve().parent
WORKER = HERE / "worker.py"
MEMORY = ":memory:"


class BenchError(Exception):
    """A child process failed or did not answer."""


class Child:
    """A process this run started; it is stopped by its PID when the run ends."""

    def __init__(self, bench: Bench, label: str, argv: list[str], *, json_io: bool) -> None:
        self.label = label
        self.log_path = bench.logs / f"{label}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if json_io else subprocess.DEVNULL,
            stdout=subprocess.PIPE if json_io else self.log,
            stderr=self.log if json_io else subprocess.PIPE,
            env=bench.env,
            cwd=bench.tmp,
            text=True,
            bufsize=1,
        )
        self.pid = self.proc.pid
        self.joined: set[str] = set()  # the other loaders a worker has a node on
        stream = self.proc.stdout if json_io else self.proc.stderr
        assert stream is not None
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()
        bench.children.append(self)

    def _pump(self, stream: TextIO) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            self.log.flush()
            return self.log_path.read_text()[-2000:]
        return ""

    def recv(self, timeout: float) -> Any:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"{self.label} gave no answer within {timeout:g}s") from None
        if line is None:
            raise BenchError(f"{self.label} exited ({self.proc.poll()}): {self.tail()}")
        answer = json.loads(line)
        if "error" in answer:
            raise BenchError(f"{self.label}: {answer['error']}\n{answer.get('traceback', '')}")
        return answer["ok"]

    def send(self, op: str, **arguments: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.proc.stdin.flush()

    def call(self, op: str, timeout: float = 120.0, **arguments: Any) -> Any:
        self.send(op, **arguments)
        return self.recv(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                self.send("exit")
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()


class Loader(Child):
    """``python -m clustorage loader`` on a free port; ready once it logs so.

    ``data`` is ``:memory:`` or a directory for the default durable SQLite store."""

    def __init__(self, bench: Bench, label: str, data: str) -> None:
        self.port = free_port()
        self.name = "L"
        self.data = data
        self.address = f"{self.name}@127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "clustorage", "loader", "--name", self.name]
        argv += ["--listen", f"127.0.0.1:{self.port}", "--data", data]
        super().__init__(bench, label, argv, json_io=False)
        self.ready = threading.Event()

    @property
    def durable(self) -> bool:
        return self.data != MEMORY

    def _pump(self, stream: TextIO) -> None:
        for line in stream:
            self.log.write(line)
            if " ready on " in line:
                self.ready.set()
        self.lines.put(None)

    def wait_ready(self, timeout: float = 30.0) -> float:
        if not self.ready.wait(timeout):
            raise BenchError(f"the loader did not start within {timeout:g}s: {self.tail()}")
        return time.perf_counter() - self.started


def worker_argv(loader: Loader | None, names: tuple[str, ...], extra: list[str]) -> list[str]:
    """The command line of a ``bench/worker.py`` child with nodes ``names`` on ``loader``."""
    argv = [sys.executable, str(WORKER)]
    if loader is not None:
        argv += ["--loader", loader.address, "--names", ",".join(names)]
    return argv + extra
