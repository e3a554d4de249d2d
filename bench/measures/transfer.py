"""A 1 MB and a 100 MB value from node A to node B, on the durable store and on
``:memory:``, beside each peer's SET plus GET; then numpy and pandas values (arrays.py)."""

from __future__ import annotations

import contextlib

from benchlib import summarize
from children import BenchError
from harness import Bench, store_label
from report import MB, verdict

from measures import arrays
from measures.nodes import join, transfers

MEMORY_SYSTEM = "memory"
TARGET_MB_S = 400


def run(bench: Bench) -> None:
    bench.say("value transfer ...")
    loader = bench.loader("transfer-loader")
    memory = bench.loader("transfer-memory-loader", durable=False)
    a = bench.worker("transfer-a", loader, ("A",))
    b = bench.worker("transfer-b", loader, ("B",))
    stores = {"default": loader, MEMORY_SYSTEM: memory}
    try:
        a.recv(60)
        b.recv(60)
        for child in (a, b):
            join(child, memory, MEMORY_SYSTEM)
        for system in stores:
            b.call("watch", key="big", system=system)
        for size, repeats in bench.sizes.transfer.items():
            measure = f"{size // MB} MB value to another node"
            a.call("make_value", size=size)
            b.call("make_value", size=size)
            target = f">= {TARGET_MB_S} MB/s" if size >= 100 * MB else ""
            for system, store in stores.items():
                with bench.attempt(measure, f"clustorage ({store_label(store)})", target):
                    rates, returns = transfers(a, b, system, "big", size, repeats)
                    stats = summarize(rates)
                    bench.record(
                        measure,
                        f"clustorage put -> B's get ({store_label(store)})",
                        "MB/s",
                        stats,
                        "A's put until B's replica has it and B's get returned",
                        target=target,
                        verdict=verdict(stats["median"] >= TARGET_MB_S) if target else None,
                    )
                    bench.record(
                        measure,
                        f"clustorage put, A's call ({store_label(store)})",
                        "MB/s",
                        summarize(returns),
                        "until A's put returns",
                    )
            for peer in bench.peers:
                with bench.attempt(measure, peer.label):
                    rates = []
                    for repeat in range(repeats + 1):  # the first warms up, as above
                        sent = a.call(
                            "peer_put", kind=peer.kind, port=peer.port, key="big", timeout=300
                        )
                        got = b.call(
                            "peer_fetch", kind=peer.kind, port=peer.port, key="big", timeout=300
                        )
                        if got["size"] != size:
                            raise BenchError(f"B read {got['size']} bytes, not {size}")
                        took = (sent["end"] - sent["start"]) + (got["end"] - got["start"])
                        if repeat:
                            rates.append(size / MB / took)
                    bench.record(
                        measure,
                        peer.operation("transfer"),
                        "MB/s",
                        summarize(rates),
                        "A's write plus B's read",
                    )
        for peer in bench.peers:
            with contextlib.suppress(Exception):
                a.call("peer_delete", kind=peer.kind, port=peer.port, key="big")
        arrays.run(bench, a, b, stores)
    finally:
        bench.stop(loader, memory, a, b)
