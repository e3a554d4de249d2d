"""The systems Clustorage is measured beside, started privately for one run: a
``multiprocessing.managers`` dict server (always), Redis without persistence and Redis with
``appendonly yes`` / ``appendfsync everysec`` (the durable peer) when redis-server and redis-py
are installed."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from benchlib import free_port
from children import WORKER, BenchError, Child

if TYPE_CHECKING:
    from harness import Bench

MANAGERS = "managers"
REDIS = "redis"
REDIS_AOF = "redis-aof"

LABELS = {
    MANAGERS: "managers dict proxy",
    REDIS: "Redis (redis-py)",
    REDIS_AOF: "Redis AOF everysec",
}
# What each peer does for one measure, as the table names it.
OPERATIONS = {
    "miss": {MANAGERS: "managers get+set", REDIS: "Redis GET+SET", REDIS_AOF: "Redis AOF GET+SET"},
    "hit": {MANAGERS: "managers proxy.get", REDIS: "Redis GET", REDIS_AOF: "Redis AOF GET"},
    "write": {
        MANAGERS: "managers proxy[k] = v",
        REDIS: "Redis SET",
        REDIS_AOF: "Redis AOF SET",
    },
    "transfer": {
        MANAGERS: "managers set+get",
        REDIS: "Redis SET+GET",
        REDIS_AOF: "Redis AOF SET+GET",
    },
    "server": {
        MANAGERS: "managers server process",
        REDIS: "redis-server",
        REDIS_AOF: "redis-server (AOF)",
    },
}


@dataclass
class Peer:
    kind: str
    port: int
    server: Child

    @property
    def label(self) -> str:
        return LABELS[self.kind]

    def operation(self, measure: str) -> str:
        return OPERATIONS[measure][self.kind]


def start_peers(bench: Bench) -> list[Peer]:
    """Start every peer that is installed; a note says why one is left out."""
    port = free_port()
    argv = [sys.executable, str(WORKER), "--manager-server", str(port)]
    server = Child(bench, "managers-server", argv, json_io=True)
    server.recv(30)
    peers = [Peer(MANAGERS, port, server)]
    if shutil.which("redis-server") is None:
        bench.notes.append(
            "Redis: skipped - redis-server is not installed (install it, e.g. "
            "'apt-get install redis-server' or 'brew install redis', to compare)"
        )
    elif importlib.util.find_spec("redis") is None:
        bench.notes.append(
            "Redis: skipped - redis-py is not installed (scripts/bootstrap.sh bench)"
        )
    else:
        peers.append(start_redis(bench, REDIS, ["--appendonly", "no"]))
        aof = ["--appendonly", "yes", "--appendfsync", "everysec"]
        peers.append(start_redis(bench, REDIS_AOF, aof))
    return peers


def start_redis(bench: Bench, kind: str, persistence: list[str]) -> Peer:
    """A private redis-server on a free port with its own directory, once it answers PING."""
    port = free_port()
    directory = bench.tmp / kind
    directory.mkdir()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += [*persistence, "--dir", str(directory)]
    server = Child(bench, f"{kind}-server", argv, json_io=False)
    wait_redis(server, port)
    return Peer(kind, port, server)


def wait_redis(server: Child, port: int) -> None:
    import redis

    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis(host="127.0.0.1", port=port).ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline or server.proc.poll() is not None:
                raise BenchError(f"redis-server did not start: {server.tail()}") from None
            time.sleep(0.02)
