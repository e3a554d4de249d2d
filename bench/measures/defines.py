"""define(name, source, force=True) from one member until acknowledged by all N + 1 nodes."""

from __future__ import annotations

from typing import Any

from children import Child
from harness import Bench
from report import fmt_time, verdict

TARGETS = {8: 2e-3, 32: 10e-3}


def run(bench: Bench, definer: Child, n: int) -> None:
    measure = f"define, acked by all: N={n}"
    with bench.attempt(measure, "clustorage"):
        stats = definer.call("define", iterations=bench.sizes.define[n], expect=n + 1, timeout=600)
        target = TARGETS.get(n)
        extra: dict[str, Any] = {}
        if target is not None:
            extra = {
                "target": f"<= {fmt_time(target)}",
                "verdict": verdict(stats["median"] <= target),
            }
        acked = stats.pop("acknowledged_by")
        if stats["short"]:
            extra["verdict"] = "missed"
        bench.record(
            measure,
            "clustorage define",
            "s",
            stats,
            f"{n} member processes; acked by {acked}/{n + 1} nodes"
            + (f", {stats['short']} short" if stats["short"] else ""),
            **extra,
        )
