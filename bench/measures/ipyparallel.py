"""ipyparallel, when installed: a cluster up and connected, push+call on N engines, an
engine's RSS."""

from __future__ import annotations

from benchlib import rss_bytes
from harness import Bench


def run(bench: Bench) -> None:
    if not bench.has_ipp:
        return
    sizes = bench.sizes
    bench.say(f"ipyparallel: {sizes.ipp_up} engines up, push+call on {sizes.ipp_push} ...")
    child = bench.worker("ipyparallel")
    try:
        child.recv(60)
        result = child.call(
            "ipyparallel",
            up_engines=sizes.ipp_up,
            repeats=sizes.ipp_repeats,
            push_sizes=list(sizes.ipp_push),
            iterations=sizes.ipp_iterations,
            timeout=900,
        )
        pids = [*result["engine_pids"], result.get("controller_pid")]
        bench.strays.update(pid for pid in pids if pid)
        bench.record(
            f"cluster of {sizes.ipp_up} up and connected",
            "ipyparallel",
            "s",
            result["up"],
            f"Cluster(n={sizes.ipp_up}).start_and_connect_sync, engines as local processes",
        )
        for n, stats in result["push_call"].items():
            bench.record(
                f"define, acked by all: N={n}",
                "ipyparallel push+call",
                "s",
                stats,
                "view.push(block=True) then view.execute(block=True)",
            )
        bench.single(
            "idle RSS of a member process",
            "ipyparallel engine",
            "B",
            rss_bytes(result["engine_pids"][0]),
            "one engine, idle",
        )
        child.call("ipyparallel_stop", timeout=120)
    except Exception as exc:
        bench.failed("ipyparallel", "ipyparallel", exc)
    finally:
        bench.stop(child)
