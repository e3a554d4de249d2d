"""One durable loader and 1..32 member processes, with a ``:memory:`` loader beside it: the
member's RSS, hits, misses on both stores, connects, defines on N members, and writes."""

from __future__ import annotations

import time

from children import Child, Loader
from harness import Bench

from measures import connects, defines, hits, member_rss, misses, writes
from measures.nodes import join

MEMORY_SYSTEM = "memory"


def run(bench: Bench) -> None:
    bench.say("hit, miss, connect, define on 1/8/32 members, writes ...")
    sizes = bench.sizes
    loader = bench.loader("main-loader")
    memory = bench.loader("memory-loader", durable=False)
    members: list[Child] = []
    stores = {"default": loader, MEMORY_SYSTEM: memory}
    try:
        first = bench.worker("m0", loader, ("m0",))
        first.recv(60)
        members.append(first)
        join(first, memory, MEMORY_SYSTEM)
        time.sleep(sizes.settle)
        member_rss.run(bench, first)
        hits.run(bench, first)
        misses.run(bench, first, {"durable": "default", ":memory:": MEMORY_SYSTEM})
        connects.run(bench, first, loader)
        counts = sorted(sizes.define)
        for n in counts:
            grow(bench, members, loader, n)
            time.sleep(sizes.settle)  # let the new processes settle before timing
            defines.run(bench, members[0], n)
            if n == sizes.writers or (n == counts[-1] and n < sizes.writers):
                writes.run(bench, members[: sizes.writers], stores)
        if max(counts) < sizes.writers:
            grow(bench, members, loader, sizes.writers)
            writes.run(bench, members, stores)
    finally:
        bench.stop(loader, memory, *members)


def grow(bench: Bench, members: list[Child], loader: Loader, n: int) -> None:
    """Start member processes (four at a time) until there are ``n``."""
    batch: list[Child] = []
    for i in range(len(members), n):
        batch.append(bench.worker(f"m{i}", loader, (f"m{i}",)))
        if len(batch) >= 4:
            for child in batch:
                child.recv(120)
            members.extend(batch)
            batch = []
    for child in batch:
        child.recv(120)
    members.extend(batch)
