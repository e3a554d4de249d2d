"""Acknowledged writes per second from several member processes at once, on the durable
store and on ``:memory:``, beside each peer's SET from as many processes, and beside the
floor model (bench/floor.py): the least a put must do in this design, what bounds it."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from benchlib import free_port, summarize
from children import Child, Loader
from harness import Bench, store_label
from peers import MANAGERS, REDIS_AOF
from report import verdict

from measures.nodes import join


def run(bench: Bench, members: list[Child], loaders: dict[str, Loader]) -> None:
    """``loaders``: the member system measured -> its loader ("default" is each member's
    first node's loader, the durable one)."""
    n = len(members)
    measure = f"acked writes/s, {n} writers at once"
    sizes = bench.sizes

    def rounds(op: str, **arguments: Any) -> list[float]:
        rates = []
        for r in range(sizes.write_rounds):
            start_at = time.time() + sizes.settle / 2  # every writer told before it
            for i, member in enumerate(members):
                member.send(
                    op,
                    start_at=start_at,
                    duration=sizes.write_seconds,
                    prefix=f"w{r}-{i}",
                    **arguments,
                )
            counts = [m.recv(sizes.write_seconds + 60)["count"] for m in members]
            rates.append(sum(counts) / sizes.write_seconds)
        return rates

    ours: dict[str, dict[str, Any]] = {}
    for system, loader in loaders.items():
        label = f"clustorage put ({store_label(loader)})"
        with bench.attempt(measure, label):
            if system != "default":
                for member in members:
                    join(member, loader, system)
            ours[label] = summarize(rounds("writes", system=system))
    theirs: dict[str, dict[str, Any]] = {}
    for peer in bench.peers:
        with bench.attempt(measure, peer.label):
            rates = rounds("peer_writes", kind=peer.kind, port=peer.port)
            theirs[peer.kind] = summarize(rates)
    floors: dict[str, dict[str, Any]] = {}
    for history in (True, False):
        label = FLOOR_LABELS[history]
        with bench.attempt(measure, label):
            server, port = start_floor(bench, history)
            try:
                floors[label] = summarize(rounds("floor_writes", port=port))
            finally:
                server.stop()
    note = (
        f"each put returns once committed; {sizes.write_rounds} rounds of {sizes.write_seconds:g}s"
    )
    for label, stats in ours.items():
        extra: dict[str, Any] = {}
        if "durable" in label and MANAGERS in theirs:
            bounds = [theirs[MANAGERS]["median"]]
            target = ">= managers"
            if REDIS_AOF in theirs:
                bounds.append(theirs[REDIS_AOF]["median"])
                target = ">= Redis AOF SET and >= managers"
            extra = {"target": target, "verdict": verdict(stats["median"] >= max(bounds))}
        bench.record(measure, label, "/s", stats, note, **extra)
    for peer in bench.peers:
        if peer.kind in theirs:
            bench.record(measure, peer.operation("write"), "/s", theirs[peer.kind], "")
    for label, stats in floors.items():
        bench.record(measure, label, "/s", stats, "a model: see bench/floor.py")


FLOOR_LABELS = {
    True: "floor model (history kept)",
    False: "floor model (one row per key)",
}


def start_floor(bench: Bench, history: bool) -> tuple[Child, int]:
    """A floor model server (bench/floor.py) on a free port with its own directory."""
    port = free_port()
    directory = bench.tmp / f"floor-{port}"
    directory.mkdir()
    argv = [sys.executable, str(Path(__file__).parent.parent / "floor.py"), "--serve", str(port)]
    argv += ["--data", str(directory), *(["--history"] if history else [])]
    server = Child(bench, f"floor-server-{port}", argv, json_io=True)
    server.recv(30)
    return server, port
