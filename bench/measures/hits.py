"""Hit latency: get and call of a loaded entry in a member process, one op at a time; the
verdict is on the overhead over the same thing done locally (a dict lookup, a plain call)."""

from __future__ import annotations

from typing import Any

from children import Child
from harness import Bench
from report import fmt_time, verdict

GET = "hit get (loaded value)"
CALL = "hit call (loaded function)"


def run(bench: Bench, member: Child) -> None:
    try:
        rows = member.call("hit", iterations=bench.sizes.hit, timeout=600)
    except Exception as exc:
        bench.failed(GET, "clustorage", exc)
        return
    timer = rows["empty (timer only)"]["median"]
    base_get = rows["dict lookup in a function"]["median"]
    base_call = rows["plain call of add"]["median"]
    note = "per op, one at a time; includes the timer's own cost (see 'empty')"
    for measure, names, base in (
        (GET, ["Node.get hit", "clustorage.get hit", "dict lookup in a function"], base_get),
        (CALL, ["Node.call hit", "clustorage.call hit", "plain call of add"], base_call),
    ):
        for name in names:
            stats = rows[name]
            extra: dict[str, Any] = {}
            text = note
            if "hit" in name:
                cost = stats["median"] - timer
                text = (
                    f"{fmt_time(cost)} net of timer, {fmt_time(stats['median'] - base)} "
                    f"over the {'dict lookup' if 'get' in name else 'plain call'}"
                )
                extra = {  # the target is the overhead over the same thing done locally
                    "target": "<= 0.3 us over it",
                    "verdict": verdict(stats["median"] - base <= 0.3e-6),
                    "net": cost,
                    "over_baseline": stats["median"] - base,
                }
            system = f"clustorage {name}" if "hit" in name else name
            bench.record(measure, system, "s", stats, text, **extra)
        if measure == GET:
            for peer in bench.peers:
                with bench.attempt(measure, peer.label):
                    stats = member.call(
                        "peer_hit",
                        kind=peer.kind,
                        port=peer.port,
                        iterations=bench.sizes.peer_hit,
                        timeout=600,
                    )
                    bench.record(
                        measure, peer.operation("hit"), "s", stats, "a round trip per read"
                    )
    bench.record(
        GET,
        "empty (timer only)",
        "s",
        rows["empty (timer only)"],
        "perf_counter_ns twice and a lambda call",
    )
