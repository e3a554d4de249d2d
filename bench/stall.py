"""A trivial miss while the loader commits a big value: does the loader keep answering?

SPEC ("The loader never stalls the cluster"): committing a big value delays only the requests
waiting on that write. This script starts a loader on a durable store (a temporary directory)
and a writer member process that puts a 500 MB value a few times, while this process, another
member, times trivial misses (`get(fresh_key, lambda: i)`): first with the loader idle, then
for as long as the writer's puts last. Everything runs on 127.0.0.1 and is stopped by PID.

    .venv/bin/python bench/stall.py            # 500 MB, 3 puts
    .venv/bin/python bench/stall.py --quick    # 20 MB, 1 put, for the tests
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import free_port, stop_process, summarize, wait_for_port

import clustorage

WRITER = """
import json, sys, time, clustorage
node = clustorage.Node('writer', sys.argv[1], timeout=600)
value = bytes(int(sys.argv[2]))
print('ready', flush=True)
sys.stdin.readline()
for _ in range(int(sys.argv[3])):
    start = time.perf_counter()
    version = node.put('big', value)
    print(json.dumps({'seconds': time.perf_counter() - start, 'version': version}), flush=True)
node.stop()
"""


def start_durable_loader(env: dict[str, str], data: Path) -> tuple[str, subprocess.Popen[Any]]:
    """A loader named L on a free port keeping its store in ``data``, once it listens."""
    port = free_port()
    command = [sys.executable, "-m", "clustorage", "loader", "--name", "L"]
    command += ["--listen", f"127.0.0.1:{port}", "--data", str(data)]
    process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
    except BaseException:
        stop_process(process)
        raise
    return f"L@127.0.0.1:{port}", process


def timed_miss(node: clustorage.Node, key: str) -> float:
    """A miss: a lease, then a commit (a store write)."""
    start = time.perf_counter()
    node.get(key, lambda: 0)
    return time.perf_counter() - start


def timed_lookup(node: clustorage.Node, key: str) -> float:
    """A lookup of a key nobody has, without a fn: one round trip, no write."""
    start = time.perf_counter()
    with contextlib.suppress(clustorage.NotFound):
        node.get(key)
    return time.perf_counter() - start


def measure(size: int, puts: int, idle_misses: int) -> dict[str, Any]:
    """Idle miss latencies, then miss latencies while the writer's puts last."""
    env = dict(os.environ, CLUSTORAGE_COOKIE=secrets.token_hex(16))
    os.environ["CLUSTORAGE_COOKIE"] = env["CLUSTORAGE_COOKIE"]
    with tempfile.TemporaryDirectory(prefix="clustorage-stall-") as data:
        address, loader = start_durable_loader(env, Path(data))
        writer: subprocess.Popen[str] | None = None
        try:
            with clustorage.Node("probe", address, timeout=60) as node:
                for i in range(50):  # warm-up
                    node.get(f"warm-{i}", lambda: 0)
                idle = [timed_miss(node, f"idle-{i}") for i in range(idle_misses)]
                idle_lookups = [timed_lookup(node, f"none-{i}") for i in range(idle_misses)]
                writer = subprocess.Popen(
                    [sys.executable, "-c", WRITER, address, str(size), str(puts)],
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert writer.stdin is not None and writer.stdout is not None
                if writer.stdout.readline().strip() != "ready":
                    raise RuntimeError("the writer member did not start")
                writer.stdin.write("go\n")
                writer.stdin.flush()
                busy: list[float] = []
                busy_lookups: list[float] = []
                failures = 0
                while writer.poll() is None:
                    try:
                        busy.append(timed_miss(node, f"busy-{len(busy) + failures}"))
                        busy_lookups.append(timed_lookup(node, f"none-{len(busy)}"))
                    except clustorage.LoaderUnavailable:
                        failures += 1
                written = [json.loads(line) for line in writer.stdout]
                return {
                    "size": size,
                    "idle": summarize(idle),
                    "busy": summarize(busy),
                    "idle_lookup": summarize(idle_lookups),
                    "busy_lookup": summarize(busy_lookups),
                    "failed_misses": failures,
                    "puts": written,
                    "writer_exit": writer.returncode,
                    "probe_connected": node.connected,
                }
        finally:
            if writer is not None and writer.poll() is None:
                stop_process(writer)
            stop_process(loader)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 MB, one put, for the tests")
    parser.add_argument("--mb", type=int, default=500, help="size of the big value (500)")
    parser.add_argument("--puts", type=int, default=3, help="how many times it is put (3)")
    args = parser.parse_args(argv)
    size = (20 if args.quick else args.mb) * 10**6
    puts = 1 if args.quick else args.puts
    result = measure(size, puts, 50 if args.quick else 500)
    print(f"{'latency':36s} {'n':>5s} {'median':>9s} {'p99':>9s} {'max':>9s}")
    rows = (
        ("miss, loader idle", result["idle"]),
        ("miss, during big puts", result["busy"]),
        ("lookup (no write), loader idle", result["idle_lookup"]),
        ("lookup (no write), during big puts", result["busy_lookup"]),
    )
    for label, stats in rows:
        print(
            f"{label:36s} {stats['n']:5d} {stats['median'] * 1e3:7.2f}ms "
            f"{stats['p99'] * 1e3:7.2f}ms {stats['max'] * 1e3:7.2f}ms"
        )
    for put in result["puts"]:
        print(f"put of {size / 1e6:g} MB: {put['seconds']:.2f}s (version {put['version']})")
    print(
        f"misses that failed: {result['failed_misses']}; writer exit {result['writer_exit']}; "
        f"probe connected: {result['probe_connected']}"
    )
    ok = result["failed_misses"] == 0 and result["writer_exit"] == 0 and len(result["puts"]) == puts
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
