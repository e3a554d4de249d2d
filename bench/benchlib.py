"""What the bench's driver (run.py) and its child processes (worker.py) share: statistics,
units, free ports and resident memory."""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "free_port",
    "rss_bytes",
    "start_loader",
    "stop_process",
    "summarize",
    "tcp_bytes_sent",
    "wait_for_port",
]


@contextlib.contextmanager
def certificates(names: Sequence[str], wanted: bool = True) -> Iterator[Path | None]:
    """A CA and a certificate for each node of ``names`` (``clustorage.init_tls``) in a
    temporary folder, for as long as the block runs; None when not ``wanted``."""
    if not wanted:
        yield None
        return
    import clustorage  # here: the modules that share this one measure its import

    with tempfile.TemporaryDirectory() as temp:
        clustorage.init_tls(Path(temp), list(names), [])
        yield Path(temp)


def tls_files(certs: Path | None, name: str) -> dict[str, str]:
    """The CLUSTORAGE_TLS_* variables of node ``name``'s files in ``certs`` (made by
    ``clustorage.init_tls``); none without TLS."""
    if certs is None:
        return {}
    return {
        "CLUSTORAGE_TLS_CERT": str(certs / f"{name}.pem"),
        "CLUSTORAGE_TLS_KEY": str(certs / f"{name}-key.pem"),
        "CLUSTORAGE_TLS_CA": str(certs / "ca.pem"),
    }


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median, minimum, maximum and 99th percentile (nearest rank) of ``samples``."""
    if not samples:
        return {"n": 0, "median": math.nan, "min": math.nan, "max": math.nan, "p99": math.nan}
    ordered = sorted(samples)
    n = len(ordered)
    middle = n // 2
    median = ordered[middle] if n % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    p99 = ordered[min(n - 1, max(0, math.ceil(0.99 * n) - 1))]
    return {"n": n, "median": median, "min": ordered[0], "max": ordered[-1], "p99": p99}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    """Return once something listens on 127.0.0.1:``port``; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.02)


def start_loader(
    env: Mapping[str, str], cwd: Path | None = None, data: str = ":memory:", stderr: Any = None
) -> tuple[str, subprocess.Popen[Any]]:
    """A loader named L on a free port of 127.0.0.1 (keeping nothing, unless ``data`` names
    a directory), once it listens: its address and process (stop it with
    :func:`stop_process`). Its log goes to ``stderr`` (a file), else nowhere."""
    port = free_port()
    command = [sys.executable, "-m", "clustorage", "loader", "--name", "L"]
    command += ["--listen", f"127.0.0.1:{port}", "--data", data]
    stderr = subprocess.DEVNULL if stderr is None else stderr
    process = subprocess.Popen(command, env=dict(env), cwd=cwd, stderr=stderr)
    try:
        wait_for_port(port)
    except BaseException:
        stop_process(process)
        raise
    return f"L@127.0.0.1:{port}", process


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM ``process`` and wait for it; SIGKILL it if it outlives ``timeout``."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def rss_bytes(pid: int | None = None) -> int:
    """The resident set size of process ``pid`` (this process by default), in bytes."""
    pid = os.getpid() if pid is None else pid
    try:
        import psutil
    except ImportError:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {pid}") from None
    return int(psutil.Process(pid).memory_info().rss)


def tcp_bytes_sent(port: int) -> int | None:
    """Bytes sent so far on the established TCP connections whose local port is ``port``
    (a server's, so: what it sent to its clients), from the kernel's TCP_INFO through
    ``ss``; None where ``ss`` is not installed. Connections that closed no longer count."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return sum(int(sent) for sent in re.findall(r"\bbytes_sent:(\d+)", out))
