"""Where a miss's time goes: CPU per operation on each end, beside multiprocessing.managers.

A miss is two round trips (lease, then commit) between a member and the loader, and neither
end can start its half before the other has finished: the wall time per operation is about
the sum of both ends' CPU time per operation. This script measures exactly that, for a plain
round trip and for a miss, in one process against a loader subprocess and a managers server
subprocess started here (both on 127.0.0.1, stopped by PID at the end).

    .venv/bin/python bench/cpu.py             # 5,000 operations each
    .venv/bin/python bench/cpu.py --quick     # 200, for the tests
    .venv/bin/python bench/cpu.py --spy DIR   # also record py-spy profiles of both ends in DIR
    .venv/bin/python bench/cpu.py --durable   # the loader on the default durable store on disk

With --spy, DIR gets loader-miss.txt and member-miss.txt (py-spy's raw format: one stack and
its sample count per line), sampled without pausing the processes.
"""

from __future__ import annotations

import argparse
import itertools
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any

import psutil
from benchlib import start_loader, stop_process

import clustorage
from clustorage.messages import VALUE, Fetch


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def per_op(
    label: str, op: Callable[[int], Any], server: psutil.Process, n: int
) -> dict[str, float | str]:
    """Wall time and both ends' CPU time per call of ``op``, after a warm-up."""
    for i in range(min(300, n)):
        op(-i - 1)
    me = psutil.Process()
    server_before, member_before = cpu_seconds(server), cpu_seconds(me)
    start = time.perf_counter()
    for i in range(n):
        op(i)
    wall = time.perf_counter() - start
    return {
        "what": label,
        "wall_us": wall / n * 1e6,
        "server_cpu_us": (cpu_seconds(server) - server_before) / n * 1e6,
        "client_cpu_us": (cpu_seconds(me) - member_before) / n * 1e6,
    }


@contextmanager
def loader(cookie: str, durable: bool) -> Iterator[tuple[str, subprocess.Popen[Any]]]:
    with tempfile.TemporaryDirectory() as temp:
        data = str(Path(temp) / "data") if durable else ":memory:"
        address, process = start_loader({**os.environ, "CLUSTORAGE_COOKIE": cookie}, data=data)
        try:
            yield address, process
        finally:
            stop_process(process)


@contextmanager
def spying(directory: Path | None, name: str, pid: int, seconds: float) -> Iterator[None]:
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    program = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which(
        "py-spy"
    )
    if program is None:
        raise SystemExit("--spy needs py-spy: scripts/bootstrap.sh bench installs it")
    spy = [program, "record", "--nonblocking", "-f", "raw"]
    spy += ["-r", "2000", "-d", str(int(seconds) + 1), "-o", str(directory / name), "-p", str(pid)]
    process = subprocess.Popen(spy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        yield
    finally:
        process.wait(seconds + 30)


def clustorage_rows(n: int, spy: Path | None, durable: bool) -> list[dict[str, float | str]]:
    cookie = secrets.token_hex(16)
    with loader(cookie, durable) as (address, process):
        node = clustorage.Node("cpu-bench", address, cookie=cookie, timeout=30)
        try:
            server = psutil.Process(process.pid)
            channel = node._channel
            keys = itertools.count()

            def round_trip(i: int) -> Any:
                return channel.request(lambda rid: Fetch(rid, VALUE, "absent", False), 30)

            def miss(i: int) -> Any:
                key = f"miss-{next(keys)}"
                return node.get(key, lambda: i)

            rows = [
                per_op("clustorage round trip (Fetch -> NotFound)", round_trip, server, n),
                per_op("clustorage miss (lease, fn, commit)", miss, server, n),
            ]
            if spy is not None:
                deadline = time.monotonic() + 5
                with (
                    spying(spy, "loader-miss.txt", process.pid, 5),
                    spying(spy, "member-miss.txt", os.getpid(), 5),
                ):
                    while time.monotonic() < deadline:
                        miss(0)
            return rows
        finally:
            node.stop()


def managers_rows(n: int) -> list[dict[str, float | str]]:
    manager = SyncManager(address=("127.0.0.1", 0), authkey=secrets.token_bytes(16))
    manager.start()
    try:
        table = manager.dict()
        server = psutil.Process(manager._process.pid)  # type: ignore[attr-defined]
        keys = itertools.count()

        def get_set(i: int) -> None:
            key = f"miss-{next(keys)}"
            if table.get(key) is None:
                table[key] = i

        return [
            per_op("managers round trip (proxy.get)", lambda i: table.get("absent"), server, n),
            per_op("managers miss (get, then set)", get_set, server, n),
        ]
    finally:
        manager.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 operations, for the tests")
    parser.add_argument("--spy", type=Path, help="record py-spy profiles of a miss into DIR")
    parser.add_argument(
        "--durable", action="store_true", help="the loader on the default durable store"
    )
    args = parser.parse_args(argv)
    n = 200 if args.quick else 5_000
    rows = clustorage_rows(n, args.spy, args.durable) + managers_rows(n)
    print(f"{'per operation':45s} {'wall':>9s} {'server CPU':>11s} {'client CPU':>11s}")
    for row in rows:
        print(
            f"{row['what']:45s} {row['wall_us']:7.1f}us {row['server_cpu_us']:9.1f}us "
            f"{row['client_cpu_us']:9.1f}us"
        )
    print("(server: the loader process / the managers server; client: this process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
