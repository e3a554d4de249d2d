"""The loader on uvloop beside the loader on asyncio's own loop, in one invocation.

Two loaders run side by side, alike but for their event loop (``CLUSTORAGE_LOOP=asyncio``
and ``=uvloop``): a trivial miss is timed from this process against each in turn, batch by
batch, and so is fan-out: a ``define`` acknowledged by N member nodes (in two processes per
loader). Batches alternate, so both loops see the same machine. uvloop is a dependency
where it has wheels; asyncio's loop is what a loader runs on elsewhere, and this says what
that costs. With ``--tls`` every connection is TLS (each loop's own).

    .venv/bin/python bench/loops.py            # 10 rounds; 16 members per loader
    .venv/bin/python bench/loops.py --tls      # the same over TLS (needs clustorage[tls])
    .venv/bin/python bench/loops.py --quick    # 2 rounds; 4 members, for the tests
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import certificates, free_port, stop_process, tls_files, wait_for_port

import clustorage

LOOPS = ("asyncio", "uvloop")
MEMBERS = """
import sys, clustorage
nodes = [clustorage.Node(f"{sys.argv[2]}-{i}", sys.argv[1]) for i in range(int(sys.argv[3]))]
print("ready", flush=True)
sys.stdin.read()
"""


def start_loader(kind: str, env: dict[str, str]) -> tuple[str, subprocess.Popen[Any]]:
    port = free_port()
    command = [sys.executable, "-m", "clustorage", "loader", "--name", "L"]
    command += ["--listen", f"127.0.0.1:{port}", "--data", ":memory:"]
    process = subprocess.Popen(
        command, env={**env, "CLUSTORAGE_LOOP": kind}, stderr=subprocess.DEVNULL
    )
    wait_for_port(port)
    return f"L@127.0.0.1:{port}", process


def start_members(address: str, label: str, count: int, env: dict[str, str]) -> Any:
    process = subprocess.Popen(
        [sys.executable, "-c", MEMBERS, address, label, str(count)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError(f"{label}: members did not start")
    return process


def miss_batch(node: clustorage.Node, prefix: str, n: int) -> float:
    """Seconds per trivial miss over ``n`` fresh keys."""
    start = time.perf_counter()
    for i in range(n):
        node.get(f"{prefix}{i}", lambda: 1)
    return (time.perf_counter() - start) / n


def define_batch(node: clustorage.Node, n: int, expected: int) -> float:
    """Seconds per define acknowledged by every node, over ``n`` defines."""
    start = time.perf_counter()
    for i in range(n):
        done = node.define("f", f"lambda: {i}")
        if len(done.installed) < expected:
            raise RuntimeError(f"only {len(done.installed)} of {expected} nodes installed it")
    return (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, 4 members")
    parser.add_argument("--tls", action="store_true", help="every connection over TLS")
    args = parser.parse_args(argv)
    with certificates(["L", "timer", "m"], args.tls) as certs:
        return run(args.quick, certs)


def run(quick: bool, certs: Path | None) -> int:
    rounds, misses, defines = (2, 100, 5) if quick else (10, 500, 20)
    per_process = 2 if quick else 8
    env = dict(os.environ, CLUSTORAGE_COOKIE=secrets.token_hex(16))
    os.environ["CLUSTORAGE_COOKIE"] = env["CLUSTORAGE_COOKIE"]
    processes: list[subprocess.Popen[Any]] = []
    nodes: dict[str, clustorage.Node] = {}
    try:
        member_env = dict(env, **tls_files(certs, "m"))
        timer = tls_files(certs, "timer")
        for kind in LOOPS:
            address, loader = start_loader(kind, dict(env, **tls_files(certs, "L")))
            processes.append(loader)
            for half in ("a", "b"):
                processes.append(start_members(address, f"{kind}{half}", per_process, member_env))
            nodes[kind] = clustorage.Node(
                f"timer-{kind}",
                address,
                tls_cert=timer.get("CLUSTORAGE_TLS_CERT"),
                tls_key=timer.get("CLUSTORAGE_TLS_KEY"),
                tls_ca=timer.get("CLUSTORAGE_TLS_CA"),
            )
        expected = 2 * per_process + 2  # the members, the timer and the loader's own node
        results: dict[str, dict[str, list[float]]] = {k: {"miss": [], "define": []} for k in LOOPS}
        for kind in LOOPS:  # warm up
            miss_batch(nodes[kind], "warm-", misses)
            define_batch(nodes[kind], 2, expected)
        for round_ in range(rounds):
            order = LOOPS if round_ % 2 == 0 else LOOPS[::-1]
            for kind in order:
                results[kind]["miss"].append(miss_batch(nodes[kind], f"r{round_}-", misses))
            for kind in order:
                results[kind]["define"].append(define_batch(nodes[kind], defines, expected))
        over = " over TLS" if certs else ""
        print(f"loader loops side by side{over}, {rounds} rounds, {2 * per_process} members each")
        for measure, label in (("miss", "miss"), ("define", f"define acked by {expected}")):
            medians = {kind: statistics.median(results[kind][measure]) for kind in LOOPS}
            for kind in LOOPS:
                print(f"  {label:<24} {kind:<8} {medians[kind] * 1e6:9.0f} µs (median of batches)")
            ratio = medians["uvloop"] / medians["asyncio"]
            print(f"  {label:<24} uvloop/asyncio: {ratio:.2f}")
    finally:
        for node in nodes.values():
            node.stop()
        for process in reversed(processes):
            if process.stdin is not None:
                process.stdin.close()
            stop_process(process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
