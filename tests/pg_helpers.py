"""A private PostgreSQL server for the tests: initdb into a temporary folder, run as a
non-root user (``nobody`` when the tests run as root), on a free port of 127.0.0.1."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port


def _bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def unavailable() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'clustorage[postgres]')"
    if _bin() is None:
        return "PostgreSQL is not installed (scripts/bootstrap.sh installs Debian's postgresql)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: cannot start PostgreSQL as another user"
    return None


class PostgresServer:
    """One private server; :meth:`database` makes a fresh database and gives its URL."""

    def __init__(self, listen: str = "127.0.0.1", trusted: str = "", fsync: bool = False) -> None:
        """``listen``: the addresses to listen on; ``trusted``: a network (CIDR) whose
        clients are let in, besides 127.0.0.1; ``fsync``: whether commits reach the disk
        (the tests kill processes, not the machine, so they do without)."""
        reason = unavailable()
        if reason is not None:
            pytest.skip(reason)
        bin_dir = _bin()
        assert bin_dir is not None
        self.bin = bin_dir
        # As root the server runs as nobody, who must reach its folder: /tmp, whatever
        # $TMPDIR says (a private temporary directory would keep it out).
        base = "/tmp" if os.geteuid() == 0 and Path("/tmp").is_dir() else None
        self.folder = Path(tempfile.mkdtemp(prefix="clustorage-pg-", dir=base))
        self.data = self.folder / "data"
        self.port = free_port()
        self.user: str | None = None
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            self.user = "nobody"
            entry = pwd.getpwnam(self.user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        self.listen = listen
        self.fsync = fsync
        self.proc: subprocess.Popen[bytes] | None = None
        self._run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )
        if trusted:
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {trusted} trust\n")
        self.start()

    def _command(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", self.user, "--", *argv] if self.user else argv

    def _run(self, argv: list[str]) -> None:
        subprocess.run(
            self._command(argv), check=True, capture_output=True, timeout=60, cwd=self.folder
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        log = open(self.folder / "server.log", "ab")  # noqa: SIM115 - the server keeps it
        self.proc = subprocess.Popen(
            self._command(
                [
                    str(self.bin / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.folder),
                    "-c",
                    f"listen_addresses={self.listen}",
                    "-c",
                    f"fsync={'on' if self.fsync else 'off'}",
                    "-c",
                    "max_connections=200",
                ]
            ),
            stdout=log,
            stderr=log,
            cwd=self.folder,
        )
        log.close()
        deadline = time.monotonic() + 30
        import psycopg

        while True:
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "PostgreSQL did not start: " + (self.folder / "server.log").read_text()
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server now (immediate shutdown), by the PID it wrote: runuser does not
        pass signals on."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pidfile = self.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGQUIT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A fresh, empty database: its URL."""
        import psycopg

        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server
    finally:
        server.close()
