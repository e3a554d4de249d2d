"""Clustorage beside the tools you would otherwise use, measured in one run on this machine.

Run:  .venv/bin/python bench/run.py [--quick] [--json PATH] [--only MEASURE,...]

It starts its own loaders (``python -m clustorage loader``, on the default durable store in a
temporary directory, and with ``--data :memory:`` beside it where the store matters) and member
processes on 127.0.0.1, and, as peers in the same run: a ``multiprocessing.managers`` dict proxy
over TCP with an authkey (always); Redis through redis-py when ``redis-server`` and redis-py
are installed (two private servers on free ports: one without persistence, one with
``appendonly yes`` and ``appendfsync everysec``); ipyparallel with local engines when it is
installed. It prints one table of medians, min-max and p99, each clustorage figure beside the
same measure of the peers, then the targets met and missed, and writes everything as JSON
(default ``bench/results.json``). Each measure is a module of ``bench/measures/``.

What is timed is stated beside each figure; times within one process use
``time.perf_counter_ns``, times between processes ``time.time()``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

from harness import HERE, Bench
from measures import (
    cluster,
    cluster_up,
    hitscript,
    imports,
    ipyparallel,
    many,
    thousand,
    transfer,
)
from peers import start_peers
from report import order, summary, table

MEASURES: dict[str, Callable[[Bench], None]] = {
    "imports": imports.run,
    "cluster-up": cluster_up.run,
    "hit-script": hitscript.run,
    "cluster": cluster.run,
    "many": many.run,
    "thousand": thousand.run,
    "transfer": transfer.run,
    "ipyparallel": ipyparallel.run,
}


def run(bench: Bench, only: list[str]) -> None:
    bench.peers = start_peers(bench)
    for note in bench.notes:
        bench.say(note)
    for name, measure in MEASURES.items():
        if only and name not in only:
            continue
        try:
            measure(bench)
        except Exception as exc:
            bench.failed(name, "clustorage", exc)


def measures(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MEASURES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"no measure named {', '.join(unknown)}; choose from {', '.join(MEASURES)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and counts, to check that the bench runs"
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="where to write the results (default bench/results.json, "
        "bench/results-quick.json with --quick)",
    )
    parser.add_argument(
        "--only",
        type=measures,
        default=[],
        metavar="MEASURE,...",
        help=f"run only these measures, of: {', '.join(MEASURES)}",
    )
    parser.add_argument(
        "--members",
        type=int,
        nargs=2,
        metavar=("PROCESSES", "NODES"),
        help="the thousand-member scenario's size: processes x Node objects each "
        "(default 10 100; 2 100 with --quick)",
    )
    parser.add_argument(
        "--no-ipyparallel",
        action="store_true",
        help="leave ipyparallel out even when it is installed",
    )
    args = parser.parse_args(argv)
    bench = Bench(args)
    if args.no_ipyparallel and bench.has_ipp:
        bench.has_ipp = False
        bench.notes.append("ipyparallel: left out (--no-ipyparallel)")
    started = time.perf_counter()
    bench.say(
        f"clustorage bench{' (quick)' if args.quick else ''}: Python {platform.python_version()}"
        f", {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    )
    try:
        run(bench, args.only)
    except KeyboardInterrupt:
        bench.say("interrupted; stopping everything this run started")
        return 130
    finally:
        bench.cleanup()
    elapsed = time.perf_counter() - started
    print()
    print(table(bench.records))
    print()
    print(summary(bench.records))
    path = (
        Path(args.json)
        if args.json
        else HERE / ("results-quick.json" if args.quick else "results.json")
    )
    path.write_text(
        json.dumps(
            {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "quick": args.quick,
                "seconds": elapsed,
                "notes": bench.notes,
                "results": order(bench.records),
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    print(f"\n{len(bench.records)} figures in {elapsed:.0f}s; JSON in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
