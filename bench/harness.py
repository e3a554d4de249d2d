"""One bench run's state: how much to measure, the processes it started, the figures it
recorded; every measure (``bench/measures/``) gets it and records into it."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import rss_bytes, summarize
from children import MEMORY, Child, Loader, worker_argv
from peers import Peer
from report import MB, verdict

HERE = Path(__file__).resolve().parent


@dataclass
class Sizes:
    """How much of everything: the full run, or --quick (only checks that the bench runs)."""

    repeats: int = 5
    import_repeats: int = 7
    hit: int = 300_000
    peer_hit: int = 20_000
    miss: int = 5_000
    connect: int = 50
    define: dict[int, int] = field(default_factory=lambda: {1: 300, 8: 300, 32: 200})
    writers: int = 8
    write_rounds: int = 3
    write_seconds: float = 2.0
    transfer: dict[int, int] = field(default_factory=lambda: {1 * MB: 20, 100 * MB: 7})
    arrays: tuple[int, int] = (100 * MB, 5)  # size, transfers counted
    many: tuple[int, int] = (10, 10)
    many_define: int = 100
    thousand: tuple[int, int] = (10, 100)  # processes x Node objects
    thousand_define: int = 30
    thousand_miss: int = 300
    thousand_value: int = 100 * MB
    thousand_join_budget: float = 120.0
    thousand_phase_budget: float = 60.0
    ipp_up: int = 3
    ipp_repeats: int = 2
    ipp_push: tuple[int, ...] = (1, 8)
    ipp_iterations: int = 30
    settle: float = 1.0  # seconds given to new processes, or a loader's memory, to settle


QUICK = Sizes(
    repeats=1,
    import_repeats=1,
    hit=2_000,
    peer_hit=200,
    miss=50,
    connect=3,
    define={1: 5, 2: 5},
    writers=2,
    write_rounds=1,
    write_seconds=0.3,
    transfer={1 * MB: 2},
    arrays=(4 * MB, 1),
    many=(2, 2),
    many_define=5,
    thousand=(2, 100),
    thousand_define=3,
    thousand_miss=20,
    thousand_value=8 * MB,
    thousand_join_budget=40.0,
    thousand_phase_budget=15.0,
    ipp_up=1,
    ipp_repeats=1,
    ipp_push=(1,),
    ipp_iterations=2,
    settle=0.1,
)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick: bool = args.quick
        self.sizes = QUICK if args.quick else Sizes()
        if getattr(args, "members", None):
            processes, per = args.members
            self.sizes.thousand = (processes, per)
        self.tmp = Path(tempfile.mkdtemp(prefix="clustorage-bench-"))
        self.logs = self.tmp / "logs"
        self.logs.mkdir()
        self.children: list[Child] = []
        self.strays: set[int] = set()
        self.records: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.env = dict(
            os.environ,
            CLUSTORAGE_COOKIE=secrets.token_urlsafe(24),
            BENCH_AUTHKEY=secrets.token_urlsafe(24),
            IPYTHONDIR=str(self.tmp / "ipython"),
            PYTHONPATH=os.pathsep.join(
                p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p
            ),
            PYTHONUNBUFFERED="1",
        )
        self.env.pop("CLUSTORAGE_LOADER", None)
        self.env.pop("CLUSTORAGE_NAME", None)
        self.env.pop("CLUSTORAGE_DATA", None)
        self.has_ipp = importlib.util.find_spec("ipyparallel") is not None
        self.peers: list[Peer] = []

    # -- bookkeeping -----------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, flush=True)

    def record(
        self,
        measure: str,
        system: str,
        unit: str,
        stats: dict[str, Any],
        note: str = "",
        **extra: Any,
    ) -> dict[str, Any]:
        row = {"measure": measure, "system": system, "unit": unit, **stats, "note": note, **extra}
        self.records.append(row)
        return row

    def loader_rss(self, loader: Loader, measure: str, note: str, limit_mb: int) -> None:
        """Record the loader's resident memory, once it settled, against a limit."""
        time.sleep(self.sizes.settle)
        rss = rss_bytes(loader.pid)
        self.record(
            measure + ": loader RSS",
            "clustorage loader",
            "B",
            summarize([rss]),
            note,
            target=f"<= {limit_mb} MB",
            verdict=verdict(rss <= limit_mb * MB),
        )

    def single(self, measure: str, system: str, unit: str, value: float, note: str = "") -> None:
        self.record(measure, system, unit, summarize([value]), note)

    def failed(self, measure: str, system: str, error: BaseException, target: str = "") -> None:
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else repr(error)
        extra = {"target": target, "verdict": "missed"} if target else {}
        self.record(
            measure, system, "error", summarize([]), f"FAILED: {first}", error=str(error), **extra
        )
        self.say(f"  {measure} / {system}: FAILED: {first}")

    @contextlib.contextmanager
    def attempt(self, measure: str, system: str, target: str = "") -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            self.failed(measure, system, exc, target)

    # -- processes -------------------------------------------------------------------------

    def worker(
        self,
        label: str,
        loader: Loader | None = None,
        names: tuple[str, ...] = (),
        extra: list[str] | None = None,
    ) -> Child:
        return Child(self, label, worker_argv(loader, names, extra or []), json_io=True)

    def loader(self, label: str, durable: bool = True) -> Loader:
        """A loader on the default durable store (a fresh data directory), or ``:memory:``."""
        data = MEMORY
        if durable:
            directory = self.tmp / f"{label}-data"
            directory.mkdir()
            data = str(directory)
        loader = Loader(self, label, data)
        loader.wait_ready()
        return loader

    def stop(self, *children: Child) -> None:
        for child in reversed(children):
            with contextlib.suppress(Exception):
                child.stop()

    def cleanup(self) -> None:
        self.stop(*self.children)
        for pid in self.strays:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.tmp, ignore_errors=True)


def store_label(loader: Loader) -> str:
    """How the table names a loader's store."""
    return "durable" if loader.durable else MEMORY
