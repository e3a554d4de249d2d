"""Acknowledged writes per second from several member processes at once, on the durable
store and on ``:memory:``, beside each peer's SET from as many processes."""

from __future__ import annotations

import time
from typing import Any

from benchlib import summarize
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
