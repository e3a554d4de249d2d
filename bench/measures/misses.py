"""Miss latency: get(fresh_key, lambda: i) on the default durable store and on ``:memory:``,
taking turns with each peer's get-then-set from one process, in rounds."""

from __future__ import annotations

import math
from typing import Any

from children import BenchError, Child
from harness import Bench
from peers import MANAGERS, REDIS_AOF
from report import verdict

MEASURE = "miss: get with a trivial fn"
DURABLE = "clustorage Node.get (durable)"
MEMORY = "clustorage Node.get (:memory:)"


def run(bench: Bench, member: Child, clusters: dict[str, str]) -> None:
    """``clusters``: the member's system for each store, {"durable": ..., ":memory:": ...}."""
    labels = {DURABLE: clusters["durable"], MEMORY: clusters[":memory:"]}
    peers = {peer.kind: peer.port for peer in bench.peers}
    with bench.attempt(MEASURE, "clustorage", "<= managers get+set"):
        stats = member.call(
            "misses",
            iterations=bench.sizes.miss,
            prefix="miss",
            peers=peers,
            clusters=labels,
            timeout=600,
        )
        managers = median(stats.get(MANAGERS))
        aof = median(stats.get(REDIS_AOF))
        targets = {
            DURABLE: durable_target(managers, aof),
            MEMORY: ("<= managers get+set", lambda ours: ours <= managers),
        }
        note = "fresh key: lease, fn, commit, hot-load; loader + 1 member; taking turns with "
        for label in (DURABLE, MEMORY):
            target, met = targets[label]
            ours = stats[label]
            if "error" in ours:
                bench.failed(MEASURE, label, BenchError(ours["error"]), target)
                continue
            known = managers == managers and (REDIS_AOF not in peers or aof == aof)
            bench.record(
                MEASURE,
                label,
                "s",
                ours,
                note + "the other store and the peers, in rounds",
                target=target,
                verdict=verdict(met(ours["median"])) if known else None,
            )
        for peer in bench.peers:
            label = peer.operation("miss")
            if "error" in stats[peer.kind]:
                bench.failed(MEASURE, label, BenchError(stats[peer.kind]["error"]))
            else:
                bench.record(MEASURE, label, "s", stats[peer.kind], "fresh key each time")


def median(stats: dict[str, Any] | None) -> float:
    return float(stats.get("median", math.nan)) if stats else math.nan


def durable_target(managers: float, aof: float) -> tuple[str, Any]:
    """The durable miss's target: no slower than Redis with AOF everysec (when it runs) and
    than 1.25 times managers' get+set."""
    if aof == aof:
        return (
            "<= Redis AOF GET+SET and <= 1.25x managers get+set",
            lambda ours: ours <= aof and ours <= 1.25 * managers,
        )
    return "<= 1.25x managers get+set", lambda ours: ours <= 1.25 * managers
