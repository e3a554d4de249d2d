"""Helpers for the Jupyter tests: an installed kernelspec, real kernels, isolated environments.

Kernels are real ``clustorage`` kernels started by jupyter_client from a kernelspec installed
into a temporary ``--prefix``; each one is shut down and, if it lingers, killed by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from clustorage import kernel as kernelspec

CLUSTORAGE_VARIABLES = (
    "CLUSTORAGE_NAME",
    "CLUSTORAGE_LOADER",
    "CLUSTORAGE_COOKIE",
    "CLUSTORAGE_LISTEN",
    "CLUSTORAGE_DATA",
)


def install_kernelspec(prefix: Path) -> Path:
    """Install the clustorage kernelspec under ``prefix``; returns its JUPYTER_PATH entry."""
    kernelspec.install(prefix=str(prefix))
    return prefix / "share" / "jupyter"


def isolated_env(home: Path, jupyter_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment with a private HOME and no inherited CLUSTORAGE_* settings."""
    env = {k: v for k, v in os.environ.items() if k not in CLUSTORAGE_VARIABLES}
    env.update(
        HOME=str(home),
        JUPYTER_PATH=str(jupyter_path),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        IPYTHONDIR=str(home / ".ipython"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def processes_with_home(home: Path) -> list[psutil.Process]:
    """Live processes whose HOME is ``home``: whatever a test started there and left."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("HOME") == str(home) and process.status() != "zombie":
                found.append(process)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def reap(home: Path, grace: float = 10) -> list[psutil.Process]:
    """Wait up to ``grace`` seconds for processes with HOME ``home`` to end, then kill them
    by PID; returns those that had to be killed."""
    deadline = time.monotonic() + grace
    left = processes_with_home(home)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = processes_with_home(home)
    for process in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
    return left


@dataclass
class Run:
    """What one execute request produced."""

    status: str
    execution_count: int = 0  # the N of In[N]
    stdout: str = ""
    stderr: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # the execute_result's mime bundle
    displays: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The result's text/plain (empty when the cell returned nothing)."""
        return str(self.data.get("text/plain", ""))


class Kernel:
    """A real kernel from the installed kernelspec, driven through jupyter_client."""

    def __init__(self, jupyter_path: Path, env: dict[str, str], connection_file: Path) -> None:
        manager = KernelSpecManager(kernel_dirs=[str(jupyter_path / "kernels")])
        self.km = KernelManager(
            kernel_name=kernelspec.KERNEL_NAME,
            kernel_spec_manager=manager,
            connection_file=str(connection_file),
        )
        self.km.start_kernel(env=env)
        self.process: subprocess.Popen[Any] | None = getattr(self.km.provisioner, "process", None)
        self.kc = self.km.client()
        self.kc.start_channels()

    def wait_ready(self, timeout: float = 60) -> Kernel:
        self.kc.wait_for_ready(timeout=timeout)
        return self

    def run(self, code: str, timeout: float = 30) -> Run:
        """Execute ``code``; returns its status, streams, result and error."""
        messages: list[dict[str, Any]] = []
        reply = self.kc.execute_interactive(
            code, output_hook=messages.append, timeout=timeout, allow_stdin=False
        )
        content = reply["content"]
        run = Run(
            status=content["status"],
            execution_count=content.get("execution_count", 0),
            messages=messages,
        )
        for msg in messages:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                if content["name"] == "stdout":
                    run.stdout += content["text"]
                else:
                    run.stderr += content["text"]
            elif kind == "execute_result":
                run.data = content["data"]
            elif kind == "display_data":
                run.displays.append(content["data"])
            elif kind == "error":
                run.error = content
        return run

    def ok(self, code: str, timeout: float = 30) -> Run:
        """Execute ``code`` and fail loudly unless it succeeded."""
        run = self.run(code, timeout)
        assert run.status == "ok", (code, run.error, run.stderr)
        return run

    def close(self) -> None:
        """Shut the kernel down; kill its process (by PID) if it is still there."""
        try:
            self.kc.stop_channels()
            self.km.shutdown_kernel(now=True)
        finally:
            process = self.process
            if process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(10)
