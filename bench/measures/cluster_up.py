"""A cluster of three up and connected; loader and member process start to ready."""

from __future__ import annotations

import time

from benchlib import summarize
from children import BenchError
from harness import Bench
from report import verdict

MEASURE = "cluster of 3 up and connected"


def run(bench: Bench) -> None:
    bench.say("cluster of 3 up and connected ...")
    up, member_ready, loader_ready = [], [], []
    with bench.attempt(MEASURE, "clustorage"):
        for i in range(bench.sizes.repeats):
            start = time.perf_counter()
            loader = bench.loader(f"up3-{i}-loader")
            loader_ready.append(time.perf_counter() - start)
            members = [
                bench.worker(f"up3-{i}-{name}", loader, (name,)) for name in ("app2", "app3")
            ]
            for member in members:
                member.recv(60)
                member_ready.append(time.perf_counter() - member.started)
            seen = members[0].call("nodes_seen")
            up.append(time.perf_counter() - start)
            if seen != 3:
                raise BenchError(f"app2 sees {seen} nodes, not 3")
            bench.stop(loader, *members)
        bench.record(
            MEASURE,
            "clustorage",
            "s",
            summarize(up),
            "spawn loader process (durable store), then 2 member processes at once, "
            "until both connected",
            target="<= 1 s",
            verdict=verdict(summarize(up)["median"] <= 1.0),
        )
        bench.record(
            "loader process start to ready",
            "clustorage",
            "s",
            summarize(loader_ready),
            "python -m clustorage loader --data DIR, until it logs that it is ready",
        )
        bench.record(
            "member process start to ready",
            "clustorage",
            "s",
            summarize(member_ready),
            "spawn python, import, connect, handshake, resync (2 at once)",
        )
