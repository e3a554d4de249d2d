"""Loaders on PostgreSQL: the miss beside the same miss on SQLite, and the takeover time.

The takeover time runs from the active loader's ``kill -9`` until a member's next miss
succeeds (SPEC "High availability"; target: at most dead_after + 1 s). Two loaders of one
name share a private PostgreSQL server (initdb in a temporary folder, as the tests start it)
unless ``--store postgresql://...`` names one; everything runs on 127.0.0.1 and is stopped by
PID at the end.

    .venv/bin/python bench/ha.py              # 2000 misses each, 5 takeovers
    .venv/bin/python bench/ha.py --quick      # 200 misses, 2 takeovers
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import free_port, stop_process, summarize, wait_for_port

import clustorage

ROOT = Path(__file__).resolve().parent.parent


def _loader(env: dict[str, str], port: int, *store: str) -> subprocess.Popen[Any]:
    command = [sys.executable, "-m", "clustorage", "loader", "--name", "L"]
    command += ["--listen", f"127.0.0.1:{port}", *store]
    process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    return process


def _misses(address: str, cookie: str, count: int) -> dict[str, Any]:
    """``count`` misses, each timed: a get of a new key whose fn returns at once."""
    with clustorage.Node("bench-m", address, cookie=cookie) as node:
        tag = secrets.token_hex(4)
        for i in range(50):  # warm up
            node.get(f"w{tag}-{i}", lambda: 0)
        samples = []
        for i in range(count):
            start = time.perf_counter()
            node.get(f"{tag}-{i}", lambda i=i: i)
            samples.append(time.perf_counter() - start)
    return summarize(samples)


def _takeovers(env: dict[str, str], store: str, rounds: int, dead_after: float) -> list[float]:
    """Seconds from each kill -9 of the active loader until a member's next miss succeeds."""
    ports = [free_port(), free_port()]
    loaders = {port: _loader(env, port, "--store", store) for port in ports}
    address = "L@" + ",".join(f"127.0.0.1:{port}" for port in ports)
    times = []
    try:
        with clustorage.Node(
            "bench-t", address, cookie=env["CLUSTORAGE_COOKIE"], dead_after=dead_after
        ) as node:
            for round_ in range(rounds):
                node.get(f"before-{round_}", lambda: 1)
                active = node.status()["cluster"]["address"]
                port = int(active.rpartition(":")[2])
                killed_at = time.perf_counter()
                os.kill(loaders[port].pid, signal.SIGKILL)
                loaders[port].wait(10)
                while True:
                    try:
                        node.get(f"after-{round_}", lambda: 2)
                        break
                    except clustorage.LoaderUnavailable:
                        time.sleep(0.01)
                times.append(time.perf_counter() - killed_at)
                loaders[port] = _loader(env, port, "--store", store)  # back, as a standby
    finally:
        for process in loaders.values():
            if process.poll() is None:
                stop_process(process)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--store", help="a PostgreSQL database to use (else a private server)")
    parser.add_argument("--dead-after", type=float, default=15.0, help="seconds (default 15)")
    args = parser.parse_args()
    misses, rounds = (200, 2) if args.quick else (2000, 5)
    cookie = secrets.token_urlsafe(16)
    env = dict(os.environ, CLUSTORAGE_COOKIE=cookie, CLUSTORAGE_DEAD_AFTER=str(args.dead_after))
    server = None
    if args.store:
        store = args.store
    else:
        sys.path.insert(0, str(ROOT))
        from tests.pg_helpers import PostgresServer, unavailable

        if (reason := unavailable()) is not None:
            print(f"skipped: {reason}")
            return 0
        server = PostgresServer(fsync=True)  # as durable as the SQLite loader
        store = server.database()
    try:
        with tempfile.TemporaryDirectory() as data:
            results = {}
            for label, options in (
                ("SQLite", ["--data", data]),
                ("PostgreSQL", ["--store", store]),
            ):
                port = free_port()
                process = _loader(env, port, *options)
                try:
                    results[label] = _misses(f"L@127.0.0.1:{port}", cookie, misses)
                finally:
                    stop_process(process)
            takeover = summarize(_takeovers(env, store, rounds, args.dead_after))
    finally:
        if server is not None:
            server.close()
    print(f"miss, {misses} each           median      p99")
    for label, figures in results.items():
        print(f"  {label:<12} {figures['median'] * 1e6:10.0f} us {figures['p99'] * 1e6:8.0f} us")
    target = args.dead_after + 1
    met = "met" if takeover["max"] <= target else "MISSED"
    print(
        f"takeover, {rounds} kill -9 of the active loader: median {takeover['median']:.2f} s, "
        f"max {takeover['max']:.2f} s (target <= dead_after + 1 = {target:g} s: {met})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
