"""Idle RSS of a member process, beside a process holding one client of each peer."""

from __future__ import annotations

import time

from benchlib import rss_bytes
from children import Child
from harness import Bench

MEASURE = "idle RSS of a member process"


def run(bench: Bench, member: Child) -> None:
    with bench.attempt(MEASURE, "clustorage"):
        bench.single(MEASURE, "clustorage", "B", rss_bytes(member.pid), "one Node, connected")
    for peer in bench.peers:
        with bench.attempt(MEASURE, peer.label):
            client = bench.worker(f"rss-{peer.kind}")
            client.recv(60)
            client.call("peer_hold", kind=peer.kind, port=peer.port, count=1)
            time.sleep(bench.sizes.settle / 2)
            bench.single(
                MEASURE,
                peer.label,
                "B",
                rss_bytes(client.pid),
                "a Python process holding one client connection",
            )
            bench.stop(client)
