"""A child process of the bench: hosts clustorage nodes and peer clients, measures on request.

The driver (run.py) starts it as ``python bench/worker.py [--loader NAME@HOST:PORT --names
a,b,...]`` with ``CLUSTORAGE_COOKIE`` set, and talks to it in JSON lines: each stdin line is
``{"op": NAME, ...arguments}``, each answer one stdout line ``{"ok": result}`` or
``{"error": "...", "traceback": "..."}``. The first line it prints says it is ready, with how
long each node took to connect. The first node is the process's default node
(``clustorage.start``); any further ones are ``clustorage.Node`` objects, each with its own
connection and name.

``python bench/worker.py --manager-server PORT`` instead serves a ``multiprocessing.managers``
dict on 127.0.0.1:PORT with the authkey in ``$BENCH_AUTHKEY``, for the peer measurements.

Timing inside one process uses ``time.perf_counter_ns``; times compared between processes
use ``time.time()``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import pickle
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.managers import BaseManager, DictProxy
from typing import Any

from benchlib import rss_bytes, summarize

Handler = Callable[..., Any]
OPS: dict[str, Handler] = {}
STATE: dict[str, Any] = {"nodes": [], "held": [], "systems": {}}
SOURCE = "def bench_fn(x):\n    return x + {n}\n"


def op(function: Handler) -> Handler:
    OPS[function.__name__] = function
    return function


def per_op(function: Callable[[], Any], iterations: int) -> list[int]:
    """Nanoseconds of each of ``iterations`` calls of ``function``, timed one by one."""
    clock = time.perf_counter_ns
    samples = [0] * iterations
    for i in range(iterations):
        start = clock()
        function()
        samples[i] = clock() - start
    return samples


def timed(samples_ns: list[int]) -> dict[str, Any]:
    return summarize([s / 1e9 for s in samples_ns])


# -- clustorage ------------------------------------------------------------------------------


def nodes() -> list[Any]:
    return STATE["nodes"]  # type: ignore[no-any-return]


def node_of(system: str) -> Any:
    """The node through which this process measures ``system`` ("default": its first node)."""
    return STATE["systems"][system] if system != "default" else nodes()[0]


def start_nodes(loader: str, names: list[str], timeout: float) -> list[float]:
    import clustorage

    seconds = []
    for i, name in enumerate(names):
        start = time.perf_counter()
        if i == 0:
            node = clustorage.start(name=name, loader=loader, timeout=timeout)
        else:
            node = clustorage.Node(name=name, loader=loader, timeout=timeout)
        wait_connected(node, timeout)
        seconds.append(time.perf_counter() - start)
        nodes().append(node)
    return seconds


def start_within(loader: str, names: list[str], timeout: float, budget: float) -> dict[str, Any]:
    """Start the nodes one after another, each once the one before is connected, until all
    are or ``budget`` seconds passed; how many joined, and how long it took."""
    import clustorage

    start = time.perf_counter()
    deadline = start + budget
    joined = 0
    for name in names:
        node = clustorage.Node(name=name, loader=loader, timeout=timeout)
        nodes().append(node)
        while not node.connected and time.perf_counter() < deadline:
            time.sleep(0.001)
        if not node.connected:
            break
        joined += 1
    return {"joined": joined, "total": len(names), "seconds": time.perf_counter() - start}


@op
def join(loader: str, name: str, system: str, wait: float) -> float:
    """One more node, on another loader, measured as ``system``; seconds to connect."""
    import clustorage

    start = time.perf_counter()
    node = clustorage.Node(name=name, loader=loader, timeout=wait)
    STATE["systems"][system] = node
    wait_connected(node, wait)
    return time.perf_counter() - start


def wait_connected(node: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not node.connected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{node.name} did not connect within {timeout:g}s")
        time.sleep(0.001)


@op
def nodes_seen() -> int:
    """How many nodes the first node knows of (loader included)."""
    return len(nodes()[0].nodes())


@op
def hit(iterations: int) -> dict[str, Any]:
    """Hit latency: get and call of entries already in the local replica, one op at a time."""
    import clustorage

    node = nodes()[0]
    node.get("hello", lambda: "world")
    node.call("add", (1, 2), "lambda a, b: a + b")
    table = {"hello": "world"}
    add = node.function("add")

    def dict_get() -> Any:
        return table["hello"]

    rows: dict[str, Callable[[], Any]] = {
        "empty (timer only)": lambda: None,
        "dict lookup in a function": dict_get,
        "Node.get hit": lambda: node.get("hello"),
        "clustorage.get hit": lambda: clustorage.get("hello"),
        "plain call of add": lambda: add(1, 2),
        "Node.call hit": lambda: node.call("add", (1, 2)),
        "clustorage.call hit": lambda: clustorage.call("add", (1, 2)),
    }
    # Rows take turns, in rounds, so that whatever else the machine does hits them alike.
    rounds = 50 if iterations >= 50_000 else 1
    samples: dict[str, list[int]] = {name: [] for name in rows}
    gc.disable()
    try:
        for function in rows.values():
            per_op(function, min(iterations, 10_000))  # warm up
        for _ in range(rounds):
            for name, function in rows.items():
                samples[name] += per_op(function, iterations // rounds)
    finally:
        gc.enable()
    return {name: timed(values) for name, values in samples.items()}


def clustorage_miss(prefix: str, system: str = "default") -> Callable[[], Any]:
    """One miss: get with a trivial fn, a fresh key each time."""
    node = node_of(system)
    counter = iter(range(10**9))

    def one() -> Any:
        i = next(counter)
        return node.get(f"{prefix}-{i}", lambda: i)

    return one


@op
def misses(
    iterations: int,
    prefix: str,
    peers: dict[str, int],
    clusters: dict[str, str] | None = None,
    budget: float | None = None,
) -> dict[str, Any]:
    """Miss latency of clustorage (each of ``clusters``: label -> system) and of each peer
    (kind: port), taking turns in rounds so that whatever else the machine does hits them
    alike. A system that fails is left out of the rounds after, with ``{"error": ...}`` in its
    place. Rounds stop after ``budget`` seconds; ``rounds`` says how many ran."""
    failed: dict[str, str] = {}
    systems: dict[str, Callable[[], Any]] = {}
    clusters = clusters or {"clustorage": "default"}
    for name in (*clusters, *peers):
        try:
            if name in clusters:
                systems[name] = clustorage_miss(f"{prefix}-{name}", clusters[name])
            else:
                systems[name] = peer_miss_op(name, peers[name], f"{prefix}-{name}")
            per_op(systems[name], min(50, iterations))  # warm up
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
            systems.pop(name, None)
    rounds = max(1, min(10, iterations // 100))
    samples: dict[str, list[int]] = {name: [] for name in systems}
    deadline = time.perf_counter() + budget if budget else math.inf
    done = 0
    for _ in range(rounds):
        if time.perf_counter() > deadline:
            break
        done += 1
        for name, one in list(systems.items()):
            try:
                samples[name] += per_op(one, iterations // rounds)
            except Exception as exc:
                failed[name] = f"{type(exc).__name__}: {exc}"
                del systems[name]
    results: dict[str, Any] = {name: timed(samples[name]) for name in systems}
    errors = {name: {"error": error} for name, error in failed.items()}
    return {**results, **errors, "rounds": {"done": done, "of": rounds}}


@op
def connect_cycle(loader: str, iterations: int, wait: float) -> dict[str, Any]:
    """Member connect-to-ready: ``Node(...)`` in a running process until it is connected."""
    import clustorage

    samples = []
    for i in range(iterations):
        start = time.perf_counter_ns()
        node = clustorage.Node(name=f"cycle-{os.getpid()}-{i}", loader=loader, timeout=wait)
        wait_connected(node, wait)
        samples.append(time.perf_counter_ns() - start)
        node.stop()
    return timed(samples)


@op
def define(iterations: int, expect: int, budget: float | None = None) -> dict[str, Any]:
    """``define(name, source, force=True)`` until it returns acknowledged by every node;
    no new define starts after ``budget`` seconds (``done`` says how many ran)."""
    node = nodes()[0]
    samples = []
    short = []
    missing: set[str] = set()
    deadline = time.perf_counter() + budget if budget else math.inf
    for i in range(iterations):
        if time.perf_counter() > deadline:
            break
        source = SOURCE.format(n=i)
        start = time.perf_counter_ns()
        definition = node.define("bench_fn", source, force=True)
        samples.append(time.perf_counter_ns() - start)
        if len(definition.installed) != expect:
            short.append(len(definition.installed))
            missing.update(definition.missing)
    result = timed(samples)
    result["acknowledged_by"] = expect if not short else min(short)
    result["short"] = len(short)
    result["missing"] = sorted(missing)[:10]
    result["done"] = len(samples)
    return result


@op
def writes(start_at: float, duration: float, prefix: str, system: str = "default") -> Any:
    """Acknowledged ``put``s, one after another, from ``start_at`` for ``duration`` seconds."""
    node = node_of(system)
    return count_until(start_at, duration, lambda i: node.put(f"{prefix}-{i % 64}", i))


def count_until(start_at: float, duration: float, write: Callable[[int], Any]) -> dict[str, Any]:
    while time.time() < start_at:
        time.sleep(0.0005)
    end = start_at + duration
    count = 0
    while time.time() < end:
        write(count)
        count += 1
    return {"count": count, "late": time.time() - end}


@op
def watch(key: str, system: str = "default") -> None:
    """Record when each version of ``key`` is installed in the node of ``system``."""
    seen: dict[int, float] = {}
    arrived = threading.Condition()

    def listener(event: Any) -> None:
        if event.key == key and not event.removed:
            with arrived:
                seen[event.version] = time.time()
                arrived.notify_all()

    node_of(system).on_load(listener)
    STATE[f"watch:{system}:{key}"] = (seen, arrived)


@op
def watched(key: str, version: int, wait: float, system: str = "default") -> dict[str, Any]:
    """The time.time() at which ``version`` of ``key`` was installed (or announced) here, and
    at which a ``get`` of it then returned (the same moment, give or take, for a value already
    here; later for one that is fetched on the first get)."""
    seen, arrived = STATE[f"watch:{system}:{key}"]
    node = node_of(system)
    deadline = time.monotonic() + wait
    with arrived:
        # A big value may be announced (its version known here) before its bytes come.
        while version not in seen and node.version(key, "value") < version:
            if time.monotonic() > deadline:
                raise TimeoutError(f"version {version} of {key!r} did not arrive within {wait}s")
            arrived.wait(0.001)
        installed = float(seen.get(version, time.time()))
    value = node.get(key)
    return {"installed": installed, "got": time.time(), "size": size_of(value)}


def size_of(value: Any) -> int:
    """Bytes of a bytes value, a numpy array or a pandas DataFrame."""
    if hasattr(value, "memory_usage"):
        return int(value.memory_usage(index=True, deep=False).sum())
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    return len(value)


@op
def make_value(size: int, kind: str = "bytes") -> int:
    """Prepare a value of about ``size`` bytes: bytes, a numpy array of float64 or a pandas
    DataFrame of four float64 columns; its exact size."""
    if kind == "bytes":
        STATE["value"] = b"x" * size
    else:
        import numpy as np

        values = np.arange(size // 8, dtype=np.float64)
        if kind == "numpy":
            STATE["value"] = values
        else:
            import pandas as pd

            STATE["value"] = pd.DataFrame(values.reshape(-1, 4), columns=list("abcd"))
    return size_of(STATE["value"])


@op
def put(key: str, system: str = "default") -> dict[str, Any]:
    """Put the prepared value; when it started and returned (time.time())."""
    value = STATE["value"]
    start = time.time()
    version = node_of(system).put(key, value)
    return {"start": start, "end": time.time(), "version": version}


@op
def get_timed(key: str, system: str = "default") -> dict[str, Any]:
    """``get(key)`` of a value that exists; how long it took and how big the value is."""
    start = time.perf_counter()
    value = node_of(system).get(key)
    return {"seconds": time.perf_counter() - start, "size": size_of(value)}


@op
def get_size(key: str) -> int:
    return len(nodes()[0].get(key))


# -- peers -----------------------------------------------------------------------------------


def redis_client(port: int) -> Any:
    import redis

    return redis.Redis(host="127.0.0.1", port=port)


class DictManager(BaseManager):
    pass


DictManager.register("table", proxytype=DictProxy)


def manager_table(port: int) -> Any:
    manager = DictManager(("127.0.0.1", port), authkey=os.environb[b"BENCH_AUTHKEY"])
    manager.connect()
    return manager.table()  # type: ignore[attr-defined]


def is_redis(kind: str) -> bool:
    """Whether peer ``kind`` is a Redis server ("redis", or "redis-aof" with persistence)."""
    return kind.startswith("redis")


def peer(kind: str, port: int) -> Any:
    """One client per process and kind, reused by every measurement."""
    key = f"{kind}:{port}"
    if key not in STATE:
        STATE[key] = redis_client(port) if is_redis(kind) else manager_table(port)
    return STATE[key]


@op
def peer_connect(kind: str, port: int, iterations: int) -> dict[str, Any]:
    """A fresh client until its first answer: Redis PING, or a managers proxy's first get."""
    samples = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        if is_redis(kind):
            client = redis_client(port)
            client.ping()
            samples.append(time.perf_counter_ns() - start)
            client.close()
        else:
            table = manager_table(port)
            table.get("hello")
            samples.append(time.perf_counter_ns() - start)
            del table
    return timed(samples)


@op
def peer_hit(kind: str, port: int, iterations: int) -> dict[str, Any]:
    """GET of a key that is there (Redis) / ``proxy.get`` (managers)."""
    client = peer(kind, port)
    if is_redis(kind):
        client.set("hello", pickle.dumps("world"))
        per_op(lambda: client.get("hello"), min(200, iterations))
        return timed(per_op(lambda: client.get("hello"), iterations))
    client["hello"] = "world"
    per_op(lambda: client.get("hello"), min(200, iterations))
    return timed(per_op(lambda: client.get("hello"), iterations))


def peer_miss_op(kind: str, port: int, prefix: str) -> Callable[[], None]:
    """What a memo cache does on a miss: GET finds nothing, the value is computed and SET."""
    client = peer(kind, port)
    counter = iter(range(10**9))

    def redis_one() -> None:
        key = f"{prefix}-{next(counter)}"
        if client.get(key) is None:
            client.set(key, pickle.dumps(key))

    def manager_one() -> None:
        key = f"{prefix}-{next(counter)}"
        if client.get(key) is None:
            client[key] = key

    return redis_one if is_redis(kind) else manager_one


@op
def floor_writes(port: int, start_at: float, duration: float, prefix: str) -> Any:
    """``writes`` against the floor model (bench/floor.py), on a connection of its own."""
    from floor import Writer

    writer = Writer(port)
    try:
        return count_until(start_at, duration, lambda i: writer.put(f"{prefix}-{i % 64}", i))
    finally:
        writer.close()


@op
def peer_writes(kind: str, port: int, start_at: float, duration: float, prefix: str) -> Any:
    client = peer(kind, port)
    if is_redis(kind):
        return count_until(
            start_at, duration, lambda i: client.set(f"{prefix}-{i % 64}", pickle.dumps(i))
        )
    return count_until(start_at, duration, lambda i: client.__setitem__(f"{prefix}-{i % 64}", i))


@op
def peer_put(kind: str, port: int, key: str) -> dict[str, Any]:
    """Store the prepared value (pickled for Redis, as a memo cache would)."""
    client = peer(kind, port)
    value = STATE["value"]
    start = time.time()
    if is_redis(kind):
        client.set(key, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    else:
        client[key] = value
    return {"start": start, "end": time.time()}


@op
def peer_fetch(kind: str, port: int, key: str) -> dict[str, Any]:
    client = peer(kind, port)
    start = time.time()
    value = pickle.loads(client.get(key)) if is_redis(kind) else client.get(key)
    end = time.time()
    return {"start": start, "end": end, "size": len(value)}


@op
def peer_delete(kind: str, port: int, key: str) -> None:
    client = peer(kind, port)
    if is_redis(kind):
        client.delete(key)
    else:
        client.pop(key, None)


@op
def peer_hold(kind: str, port: int, count: int) -> int:
    """Open ``count`` more connections and keep them (for the server's RSS)."""
    for _ in range(count):
        if is_redis(kind):
            client = redis_client(port)
            client.ping()
        else:
            client = manager_table(port)
            client.get("hello")
        STATE["held"].append(client)
    return len(STATE["held"])


# -- ipyparallel -----------------------------------------------------------------------------


@op
def ipyparallel(up_engines: int, repeats: int, push_sizes: list[int], iterations: int) -> Any:
    """Cluster up-and-connected, then push+call of a function on N engines."""
    import ipyparallel as ipp

    def square(x: int) -> int:
        return x * x

    up = []
    result: dict[str, Any] = {"pids": []}
    for attempt in range(repeats):
        start = time.perf_counter_ns()
        cluster = ipp.Cluster(n=up_engines, log_level=logging.WARNING)
        client = cluster.start_and_connect_sync(activate=False)
        client.wait_for_engines(up_engines, timeout=120, interactive=False)
        up.append(time.perf_counter_ns() - start)
        result["pids"] = list(client[:].apply_sync(os.getpid))
        if attempt < repeats - 1:
            client.close()
            cluster.stop_cluster_sync()
    result["up"] = timed(up)
    result["engine_pids"] = list(result["pids"])
    try:
        controller = cluster.controller.process.pid
        result["controller_pid"] = controller
    except AttributeError:
        result["controller_pid"] = None
    STATE["ipp"] = (cluster, client)
    most = max(push_sizes)
    if most > up_engines:
        cluster.start_engines_sync(n=most - up_engines)
        client.wait_for_engines(most, timeout=300, interactive=False)
    result["engine_pids"] = list(client[:].apply_sync(os.getpid))
    push = {}
    for n in push_sizes:
        view = client[list(client.ids[:n])]

        def push_call(view: Any = view) -> None:
            view.push({"square": square}, block=True)
            view.execute("_bench = square(3)", block=True)

        per_op(push_call, 2)
        push[str(n)] = timed(per_op(push_call, iterations))
    result["push_call"] = push
    return result


@op
def ipyparallel_stop() -> None:
    cluster, client = STATE.pop("ipp")
    client.close()
    cluster.stop_cluster_sync()


# -- the loop --------------------------------------------------------------------------------


@op
def pid() -> int:
    return os.getpid()


@op
def rss() -> int:
    return rss_bytes()


def serve_manager(port: int) -> None:
    table: dict[str, Any] = {}
    DictManager.register("table", callable=lambda: table, proxytype=DictProxy)
    manager = DictManager(("127.0.0.1", port), authkey=os.environb[b"BENCH_AUTHKEY"])
    server = manager.get_server()  # type: ignore[no-untyped-call]
    print(json.dumps({"ok": {"ready": True}}), flush=True)
    threading.Thread(target=_exit_at_end_of_input, daemon=True).start()
    server.serve_forever()


def _exit_at_end_of_input() -> None:
    """Exit once run.py closes this process's input (after its "exit"), as the workers do."""
    for _ in sys.stdin:
        pass
    os._exit(0)


def main() -> int:
    parser = argparse.ArgumentParser(description="a child process of bench/run.py")
    parser.add_argument("--loader", help="NAME@HOST:PORT of the loader")
    parser.add_argument("--names", default="", help="comma-separated node names to start")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="answer once the nodes joined or SECONDS passed, with how many did",
    )
    parser.add_argument("--manager-server", type=int, metavar="PORT")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.manager_server:
        serve_manager(args.manager_server)
        return 0
    # Answers go to the original stdout; anything a library prints goes to stderr.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    names = [name for name in args.names.split(",") if name]
    try:
        if args.budget is not None:
            ready = start_within(args.loader, names, args.timeout, args.budget)
        else:
            ready = {"connect": start_nodes(args.loader, names, args.timeout) if names else []}
    except Exception as exc:
        answers.write(json.dumps({"error": repr(exc), "traceback": traceback.format_exc()}) + "\n")
        return 1
    answers.write(json.dumps({"ok": {**ready, "pid": os.getpid()}}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        name = request.pop("op")
        if name == "exit":
            break
        try:
            answer = {"ok": OPS[name](**request)}
        except BaseException as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        answers.write(json.dumps(answer) + "\n")
    for node in [*reversed(nodes()), *STATE["systems"].values()]:
        node.stop()
    if "ipp" in STATE:
        ipyparallel_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
