"""100 members on one loader: 10 processes x 10 Node objects, each its own connection; time
until all connected, define acked by all, loader RSS; each peer server's RSS with as many
clients."""

from __future__ import annotations

import time

from benchlib import rss_bytes, summarize
from children import Child
from harness import Bench
from report import verdict


def run(bench: Bench) -> None:
    processes, per = bench.sizes.many
    total = processes * per
    bench.say(f"{total} members on one loader ...")
    loader = bench.loader("many-loader")
    workers: list[Child] = []
    try:
        measure = f"{total} members on one loader"
        with bench.attempt(measure, "clustorage"):
            start = time.perf_counter()
            for p in range(processes):
                names = tuple(f"p{p}-n{i}" for i in range(per))
                workers.append(bench.worker(f"many-{p}", loader, names))
            for child in workers:
                child.recv(300)
            up = time.perf_counter() - start
            # Membership news reaches nodes a moment after the last one connects.
            deadline = time.monotonic() + 10
            while (seen := workers[0].call("nodes_seen")) < total + 1:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            note = f"{processes} processes x {per} Node objects, each its own connection"
            bench.record(
                measure + ": all connected",
                "clustorage",
                "s",
                summarize([up]),
                f"{seen - 1}/{total} members seen; " + note,
                target=f"{total} connected",
                verdict=verdict(seen == total + 1),
            )
            stats = workers[0].call(
                "define", iterations=bench.sizes.many_define, expect=total + 1, timeout=600
            )
            acked = stats.pop("acknowledged_by")
            bench.record(
                measure + ": define acked by all",
                "clustorage define",
                "s",
                stats,
                f"acked by {acked}/{total + 1} nodes",
                target="<= 50 ms",
                verdict=verdict(stats["median"] <= 0.05 and not stats["short"]),
            )
            bench.loader_rss(loader, measure, "idle, after the defines", 150)
        for peer in bench.peers:
            with bench.attempt(measure + ": server RSS", peer.label):
                for child in workers:
                    child.call("peer_hold", kind=peer.kind, port=peer.port, count=per)
                time.sleep(bench.sizes.settle / 2)
                bench.record(
                    measure + ": loader RSS",
                    peer.operation("server"),
                    "B",
                    summarize([rss_bytes(peer.server.pid)]),
                    f"{total} clients connected",
                )
    finally:
        bench.stop(loader, *workers)
