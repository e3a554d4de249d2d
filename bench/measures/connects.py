"""Member connect-to-ready: a new Node in a running process until connected, beside a new
client of each peer until its first answer."""

from __future__ import annotations

from children import Child, Loader
from harness import Bench

MEASURE = "member connect-to-ready"


def run(bench: Bench, member: Child, loader: Loader) -> None:
    with bench.attempt(MEASURE, "clustorage"):
        stats = member.call(
            "connect_cycle",
            loader=loader.address,
            iterations=bench.sizes.connect,
            wait=30.0,
            timeout=600,
        )
        bench.record(
            MEASURE,
            "clustorage Node()",
            "s",
            stats,
            "in a running process: connect, handshake, resync",
        )
    for peer in bench.peers:
        with bench.attempt(MEASURE, peer.label):
            stats = member.call(
                "peer_connect",
                kind=peer.kind,
                port=peer.port,
                iterations=bench.sizes.connect,
                timeout=600,
            )
            bench.record(MEASURE, peer.label, "s", stats, "new client until its first answer")
