"""Clustorage beside the tools you would otherwise use, measured in one run on this machine.

Run:  .venv/bin/python bench/run.py [--quick] [--json PATH]

It starts its own loader (``python -m clustorage loader --data :memory:``) and member processes
on 127.0.0.1, and, as peers in the same run: a ``multiprocessing.managers`` dict proxy over TCP
with an authkey (always); Redis through redis-py when ``redis-server`` and redis-py are
installed (a private server on a free port); ipyparallel with local engines when it is
installed. It prints one table of medians, min-max and p99, each clustorage figure beside the
same measure of the peers, then the targets met and missed, and writes everything as JSON
(default ``bench/results.json``).

What is timed is stated beside each figure; times within one process use
``time.perf_counter_ns``, times between processes ``time.time()``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from benchlib import free_port, rss_bytes, summarize

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "worker.py"
MB = 1_000_000
HEADER = f"{'measure / system':<38} {'median':>11} {'min - max':>25} {'p99':>11}  target"


@dataclass
class Sizes:
    """How much of everything: the full run, or --quick (only checks that the bench runs)."""

    repeats: int = 5
    import_repeats: int = 7
    hit: int = 300_000
    peer_hit: int = 20_000
    miss: int = 5_000
    connect: int = 50
    define: dict[int, int] = field(default_factory=lambda: {1: 300, 8: 300, 32: 200})
    writers: int = 8
    write_rounds: int = 3
    write_seconds: float = 2.0
    transfer: dict[int, int] = field(default_factory=lambda: {1 * MB: 20, 100 * MB: 7})
    many: tuple[int, int] = (10, 10)
    many_define: int = 100
    ipp_up: int = 3
    ipp_repeats: int = 2
    ipp_push: tuple[int, ...] = (1, 8)
    ipp_iterations: int = 30


QUICK = Sizes(
    repeats=1,
    import_repeats=1,
    hit=2_000,
    peer_hit=200,
    miss=50,
    connect=3,
    define={1: 5, 2: 5},
    writers=2,
    write_rounds=1,
    write_seconds=0.3,
    transfer={1 * MB: 2},
    many=(2, 2),
    many_define=5,
    ipp_up=1,
    ipp_repeats=1,
    ipp_push=(1,),
    ipp_iterations=2,
)


class BenchError(Exception):
    """A child process failed or did not answer."""


# -- child processes -----------------------------------------------------------------------


class Child:
    """A process this run started; it is stopped by its PID when the run ends."""

    def __init__(self, bench: Bench, label: str, argv: list[str], *, json_io: bool) -> None:
        self.label = label
        self.log_path = bench.logs / f"{label}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if json_io else subprocess.DEVNULL,
            stdout=subprocess.PIPE if json_io else self.log,
            stderr=self.log if json_io else subprocess.PIPE,
            env=bench.env,
            cwd=bench.tmp,
            text=True,
            bufsize=1,
        )
        self.pid = self.proc.pid
        stream = self.proc.stdout if json_io else self.proc.stderr
        assert stream is not None
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()
        bench.children.append(self)

    def _pump(self, stream: TextIO) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            self.log.flush()
            return self.log_path.read_text()[-2000:]
        return ""

    def recv(self, timeout: float) -> Any:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"{self.label} gave no answer within {timeout:g}s") from None
        if line is None:
            raise BenchError(f"{self.label} exited ({self.proc.poll()}): {self.tail()}")
        answer = json.loads(line)
        if "error" in answer:
            raise BenchError(f"{self.label}: {answer['error']}\n{answer.get('traceback', '')}")
        return answer["ok"]

    def send(self, op: str, **arguments: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.proc.stdin.flush()

    def call(self, op: str, timeout: float = 120.0, **arguments: Any) -> Any:
        self.send(op, **arguments)
        return self.recv(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                self.send("exit")
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()


class Loader(Child):
    """``python -m clustorage loader`` on a free port; ready once it logs so."""

    def __init__(self, bench: Bench, label: str) -> None:
        self.port = free_port()
        self.name = "L"
        self.address = f"{self.name}@127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "clustorage", "loader", "--name", self.name]
        argv += ["--listen", f"127.0.0.1:{self.port}", "--data", ":memory:"]
        super().__init__(bench, label, argv, json_io=False)
        self.ready = threading.Event()

    def _pump(self, stream: TextIO) -> None:
        for line in stream:
            self.log.write(line)
            if " ready on " in line:
                self.ready.set()
        self.lines.put(None)

    def wait_ready(self, timeout: float = 30.0) -> float:
        if not self.ready.wait(timeout):
            raise BenchError(f"the loader did not start within {timeout:g}s: {self.tail()}")
        return time.perf_counter() - self.started


# -- the run ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick: bool = args.quick
        self.sizes = QUICK if args.quick else Sizes()
        self.tmp = Path(tempfile.mkdtemp(prefix="clustorage-bench-"))
        self.logs = self.tmp / "logs"
        self.logs.mkdir()
        self.children: list[Child] = []
        self.strays: set[int] = set()
        self.records: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.env = dict(
            os.environ,
            CLUSTORAGE_COOKIE=secrets.token_urlsafe(24),
            BENCH_AUTHKEY=secrets.token_urlsafe(24),
            IPYTHONDIR=str(self.tmp / "ipython"),
            PYTHONPATH=os.pathsep.join(
                p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p
            ),
            PYTHONUNBUFFERED="1",
        )
        self.env.pop("CLUSTORAGE_LOADER", None)
        self.env.pop("CLUSTORAGE_NAME", None)
        self.redis_port: int | None = None
        self.manager_port: int | None = None
        self.has_ipp = importlib.util.find_spec("ipyparallel") is not None
        self.peers: list[str] = ["managers"]

    # -- bookkeeping -----------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, flush=True)

    def record(
        self,
        measure: str,
        system: str,
        unit: str,
        stats: dict[str, Any],
        note: str = "",
        **extra: Any,
    ) -> dict[str, Any]:
        row = {"measure": measure, "system": system, "unit": unit, **stats, "note": note, **extra}
        self.records.append(row)
        return row

    def single(self, measure: str, system: str, unit: str, value: float, note: str = "") -> None:
        self.record(measure, system, unit, summarize([value]), note)

    def failed(self, measure: str, system: str, error: BaseException, target: str = "") -> None:
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else repr(error)
        extra = {"target": target, "verdict": "missed"} if target else {}
        self.record(
            measure, system, "error", summarize([]), f"FAILED: {first}", error=str(error), **extra
        )
        self.say(f"  {measure} / {system}: FAILED: {first}")

    @contextlib.contextmanager
    def attempt(self, measure: str, system: str, target: str = "") -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            self.failed(measure, system, exc, target)

    def worker(
        self, label: str, loader: Loader | None = None, names: tuple[str, ...] = ()
    ) -> Child:
        argv = [sys.executable, str(WORKER)]
        if loader is not None:
            argv += ["--loader", loader.address, "--names", ",".join(names)]
        return Child(self, label, argv, json_io=True)

    def loader(self, label: str) -> Loader:
        loader = Loader(self, label)
        loader.wait_ready()
        return loader

    def stop(self, *children: Child) -> None:
        for child in reversed(children):
            with contextlib.suppress(Exception):
                child.stop()

    def cleanup(self) -> None:
        self.stop(*self.children)
        for pid in self.strays:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- peers -----------------------------------------------------------------------------

    def start_peers(self) -> None:
        port = free_port()
        server = Child(
            self,
            "managers-server",
            [sys.executable, str(WORKER), "--manager-server", str(port)],
            json_io=True,
        )
        server.recv(30)
        self.manager_port = port
        self.manager_server = server
        if shutil.which("redis-server") is None:
            self.notes.append(
                "Redis: skipped - redis-server is not installed (install it, e.g. "
                "'apt-get install redis-server' or 'brew install redis', to compare)"
            )
        elif importlib.util.find_spec("redis") is None:
            self.notes.append(
                "Redis: skipped - redis-py is not installed (scripts/bootstrap.sh bench)"
            )
        else:
            self.redis_port = free_port()
            argv = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1"]
            argv += ["--save", "", "--appendonly", "no", "--dir", str(self.tmp)]
            self.redis_server = Child(self, "redis-server", argv, json_io=False)
            self._wait_redis()
            self.peers.append("redis")
        if not self.has_ipp:
            self.notes.append(
                "ipyparallel: skipped - not installed (scripts/bootstrap.sh bench adds it)"
            )

    def _wait_redis(self) -> None:
        import redis

        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(host="127.0.0.1", port=self.redis_port).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.redis_server.proc.poll() is not None:
                    tail = self.redis_server.tail()
                    raise BenchError(f"redis-server did not start: {tail}") from None
                time.sleep(0.02)

    def peer_port(self, kind: str) -> int:
        port = self.redis_port if kind == "redis" else self.manager_port
        assert port is not None
        return port

    @staticmethod
    def peer_label(kind: str) -> str:
        return {"redis": "Redis (redis-py)", "managers": "managers dict proxy"}[kind]

    # -- 1. import time --------------------------------------------------------------------

    def imports(self) -> None:
        self.say("import times ...")
        modules = [("clustorage", "clustorage"), ("multiprocessing.managers", "managers")]
        if "redis" in self.peers:
            modules.append(("redis", "Redis (redis-py)"))
        if self.has_ipp:
            modules.append(("ipyparallel", "ipyparallel"))
        code = "import time; t = time.perf_counter(); import {m}; print(time.perf_counter() - t)"
        for module, label in modules:
            system = f"import {module}" if label == module else f"{label}: import {module}"
            with self.attempt("import time (fresh interpreter)", system):
                samples = []
                for _ in range(self.sizes.import_repeats):
                    out = subprocess.run(
                        [sys.executable, "-c", code.format(m=module)],
                        env=self.env,
                        cwd=self.tmp,
                        capture_output=True,
                        text=True,
                        timeout=60,
                        check=True,
                    )
                    samples.append(float(out.stdout.strip().splitlines()[-1]))
                self.record("import time (fresh interpreter)", system, "s", summarize(samples))

    # -- 1b. bench/hit.py -----------------------------------------------------------------

    def hit_script(self) -> None:
        """bench/hit.py's figures: best of several timeit runs, no per-op timer cost."""
        script = HERE / "hit.py"
        if not script.exists():
            return
        self.say("bench/hit.py ...")
        with self.attempt("hit (bench/hit.py, timeit best)", "clustorage"):
            argv = [sys.executable, str(script), "--json", *(["--quick"] if self.quick else [])]
            out = subprocess.run(
                argv, env=self.env, cwd=self.tmp, capture_output=True, text=True, timeout=300
            )
            if out.returncode != 0:
                raise BenchError(f"bench/hit.py exited {out.returncode}: {out.stderr[-1000:]}")
            for name, ns in json.loads(out.stdout).items():
                self.single(
                    "hit (bench/hit.py, timeit best)",
                    name,
                    "s",
                    ns / 1e9,
                    "in-process loader node; ns per op, best of repeats",
                )

    # -- 2. a cluster of three up and connected --------------------------------------------

    def cluster_of_three(self) -> None:
        self.say("cluster of 3 up and connected ...")
        up, member_ready, loader_ready = [], [], []
        with self.attempt("cluster of 3 up and connected", "clustorage"):
            for i in range(self.sizes.repeats):
                start = time.perf_counter()
                loader = self.loader(f"up3-{i}-loader")
                loader_ready.append(time.perf_counter() - start)
                members = [
                    self.worker(f"up3-{i}-{name}", loader, (name,)) for name in ("app2", "app3")
                ]
                for member in members:
                    member.recv(60)
                    member_ready.append(time.perf_counter() - member.started)
                seen = members[0].call("nodes_seen")
                up.append(time.perf_counter() - start)
                if seen != 3:
                    raise BenchError(f"app2 sees {seen} nodes, not 3")
                self.stop(loader, *members)
            self.record(
                "cluster of 3 up and connected",
                "clustorage",
                "s",
                summarize(up),
                "spawn loader process, then 2 member processes at once, until both connected",
                target="<= 1 s",
                verdict=verdict(summarize(up)["median"] <= 1.0),
            )
            self.record(
                "loader process start to ready",
                "clustorage",
                "s",
                summarize(loader_ready),
                "python -m clustorage loader, until it logs that it is ready",
            )
            self.record(
                "member process start to ready",
                "clustorage",
                "s",
                summarize(member_ready),
                "spawn python, import, connect, handshake, resync (2 at once)",
            )

    # -- 3. one loader, 1..32 members ------------------------------------------------------

    def main_cluster(self) -> None:
        self.say("hit, miss, connect, define on 1/8/32 members, writes ...")
        loader = self.loader("main-loader")
        members: list[Child] = []
        try:
            first = self.worker("m0", loader, ("m0",))
            first.recv(60)
            members.append(first)
            time.sleep(1.0)
            self.member_rss(first)
            self.hits(first)
            self.misses(first)
            self.connects(first, loader)
            counts = sorted(self.sizes.define)
            for n in counts:
                self.grow(members, loader, n)
                time.sleep(1.0)  # let the new processes settle before timing
                self.defines(members[0], n, loader)
                if n == self.sizes.writers or (n == counts[-1] and n < self.sizes.writers):
                    self.writes(members[: self.sizes.writers], loader)
            if max(counts) < self.sizes.writers:
                self.grow(members, loader, self.sizes.writers)
                self.writes(members, loader)
        finally:
            self.stop(loader, *members)

    def grow(self, members: list[Child], loader: Loader, n: int) -> None:
        batch: list[Child] = []
        for i in range(len(members), n):
            batch.append(self.worker(f"m{i}", loader, (f"m{i}",)))
            if len(batch) >= 4:
                for child in batch:
                    child.recv(120)
                members.extend(batch)
                batch = []
        for child in batch:
            child.recv(120)
        members.extend(batch)

    def member_rss(self, member: Child) -> None:
        measure = "idle RSS of a member process"
        with self.attempt(measure, "clustorage"):
            self.single(measure, "clustorage", "B", rss_bytes(member.pid), "one Node, connected")
        for kind in self.peers:
            with self.attempt(measure, self.peer_label(kind)):
                client = self.worker(f"rss-{kind}")
                client.recv(60)
                client.call("peer_hold", kind=kind, port=self.peer_port(kind), count=1)
                time.sleep(0.5)
                self.single(
                    measure,
                    self.peer_label(kind),
                    "B",
                    rss_bytes(client.pid),
                    "a Python process holding one client connection",
                )
                self.stop(client)

    def hits(self, member: Child) -> None:
        try:
            rows = member.call("hit", iterations=self.sizes.hit, timeout=600)
        except Exception as exc:
            self.failed("hit get (loaded value)", "clustorage", exc)
            return
        timer = rows["empty (timer only)"]["median"]
        base_get = rows["dict lookup in a function"]["median"]
        base_call = rows["plain call of add"]["median"]
        note = "per op, one at a time; includes the timer's own cost (see 'empty')"
        for measure, names, base in (
            (
                "hit get (loaded value)",
                ["Node.get hit", "clustorage.get hit", "dict lookup in a function"],
                base_get,
            ),
            (
                "hit call (loaded function)",
                ["Node.call hit", "clustorage.call hit", "plain call of add"],
                base_call,
            ),
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
                self.record(
                    measure,
                    f"clustorage {name}" if "hit" in name else name,
                    "s",
                    stats,
                    text,
                    **extra,
                )
            if "get" in measure:
                for kind in self.peers:
                    with self.attempt(measure, self.peer_label(kind)):
                        stats = member.call(
                            "peer_hit",
                            kind=kind,
                            port=self.peer_port(kind),
                            iterations=self.sizes.peer_hit,
                            timeout=600,
                        )
                        label = "Redis GET" if kind == "redis" else "managers proxy.get"
                        self.record(measure, label, "s", stats, "a round trip per read")
        self.record(
            "hit get (loaded value)",
            "empty (timer only)",
            "s",
            rows["empty (timer only)"],
            "perf_counter_ns twice and a lambda call",
        )

    def misses(self, member: Child) -> None:
        measure = "miss: get with a trivial fn"
        target = "<= managers get+set"
        peers = {kind: self.peer_port(kind) for kind in self.peers}
        with self.attempt(measure, "clustorage", target):
            stats = member.call(
                "misses", iterations=self.sizes.miss, prefix="miss", peers=peers, timeout=600
            )
            bound = stats.get("managers", {}).get("median", math.nan)
            ours = stats["clustorage"]
            if "error" in ours:
                self.failed(measure, "clustorage", BenchError(ours["error"]), target)
            else:
                self.record(
                    measure,
                    "clustorage Node.get",
                    "s",
                    ours,
                    "fresh key: lease, fn, commit, hot-load; loader + 1 member; "
                    "taking turns with the peers, in rounds",
                    target=target,
                    verdict=verdict(ours["median"] <= bound) if bound == bound else None,
                )
            for kind in self.peers:
                label = "Redis GET+SET" if kind == "redis" else "managers get+set"
                if "error" in stats[kind]:
                    self.failed(measure, label, BenchError(stats[kind]["error"]))
                else:
                    self.record(measure, label, "s", stats[kind], "fresh key each time")

    def connects(self, member: Child, loader: Loader) -> None:
        measure = "member connect-to-ready"
        with self.attempt(measure, "clustorage"):
            stats = member.call(
                "connect_cycle",
                loader=loader.address,
                iterations=self.sizes.connect,
                wait=30.0,
                timeout=600,
            )
            self.record(
                measure,
                "clustorage Node()",
                "s",
                stats,
                "in a running process: connect, handshake, resync",
            )
        for kind in self.peers:
            with self.attempt(measure, self.peer_label(kind)):
                stats = member.call(
                    "peer_connect",
                    kind=kind,
                    port=self.peer_port(kind),
                    iterations=self.sizes.connect,
                    timeout=600,
                )
                self.record(
                    measure, self.peer_label(kind), "s", stats, "new client until its first answer"
                )

    def defines(self, definer: Child, n: int, loader: Loader) -> None:
        measure = f"define, acked by all: N={n}"
        with self.attempt(measure, "clustorage"):
            stats = definer.call(
                "define", iterations=self.sizes.define[n], expect=n + 1, timeout=600
            )
            target = {8: 2e-3, 32: 10e-3}.get(n)
            extra: dict[str, Any] = {}
            if target is not None:
                extra = {
                    "target": f"<= {fmt_time(target)}",
                    "verdict": verdict(stats["median"] <= target),
                }
            acked = stats.pop("acknowledged_by")
            if stats["short"]:
                extra["verdict"] = "missed"
            self.record(
                measure,
                "clustorage define",
                "s",
                stats,
                f"{n} member processes; acked by {acked}/{n + 1} nodes"
                + (f", {stats['short']} short" if stats["short"] else ""),
                **extra,
            )

    def writes(self, members: list[Child], loader: Loader) -> None:
        n = len(members)
        measure = f"acked writes/s, {n} writers at once"
        sizes = self.sizes

        def rounds(op: str, **arguments: Any) -> list[float]:
            rates = []
            for r in range(sizes.write_rounds):
                start_at = time.time() + 0.5
                for i, member in enumerate(members):
                    member.send(
                        op,
                        start_at=start_at,
                        duration=sizes.write_seconds,
                        prefix=f"w{r}-{i}",
                        **arguments,
                    )
                counts = [m.recv(sizes.write_seconds + 60)["count"] for m in members]
                rates.append(sum(counts) / sizes.write_seconds)
            return rates

        with self.attempt(measure, "clustorage"):
            self.record(
                measure,
                "clustorage put",
                "/s",
                summarize(rounds("writes")),
                f"each put returns once committed; {sizes.write_rounds} rounds of "
                f"{sizes.write_seconds:g}s",
            )
        for kind in self.peers:
            with self.attempt(measure, self.peer_label(kind)):
                rates = rounds("peer_writes", kind=kind, port=self.peer_port(kind))
                label = "Redis SET" if kind == "redis" else "managers proxy[k] = v"
                self.record(measure, label, "/s", summarize(rates), "")

    # -- 4. value transfer -----------------------------------------------------------------

    def transfer(self) -> None:
        self.say("value transfer ...")
        loader = self.loader("transfer-loader")
        a = self.worker("transfer-a", loader, ("A",))
        b = self.worker("transfer-b", loader, ("B",))
        try:
            a.recv(60)
            b.recv(60)
            b.call("watch", key="big")
            for size, repeats in self.sizes.transfer.items():
                measure = f"{size // MB} MB value to another node"
                a.call("make_value", size=size)
                b.call("make_value", size=size)
                target = ">= 400 MB/s" if size >= 100 * MB else ""
                with self.attempt(measure, "clustorage", target):
                    rates, returns = [], []
                    for repeat in range(repeats + 1):  # the first warms up and is not counted
                        sent = a.call("put", key="big", timeout=300)
                        arrived = b.call(
                            "watched", key="big", version=sent["version"], wait=120.0, timeout=300
                        )
                        if repeat:
                            rates.append(size / MB / (arrived - sent["start"]))
                            returns.append(size / MB / (sent["end"] - sent["start"]))
                    self.record(
                        measure,
                        "clustorage put -> hot-load",
                        "MB/s",
                        summarize(rates),
                        "A's put until B's replica has installed it",
                        target=target,
                        verdict=verdict(summarize(rates)["median"] >= 400)
                        if size >= 100 * MB
                        else None,
                    )
                    self.record(
                        measure,
                        "clustorage put (A's call)",
                        "MB/s",
                        summarize(returns),
                        "until A's put returns",
                    )
                for kind in self.peers:
                    with self.attempt(measure, self.peer_label(kind)):
                        port = self.peer_port(kind)
                        rates = []
                        for repeat in range(repeats + 1):  # the first warms up, as above
                            sent = a.call("peer_put", kind=kind, port=port, key="big", timeout=300)
                            got = b.call("peer_fetch", kind=kind, port=port, key="big", timeout=300)
                            if got["size"] != size:
                                raise BenchError(f"B read {got['size']} bytes, not {size}")
                            took = (sent["end"] - sent["start"]) + (got["end"] - got["start"])
                            if repeat:
                                rates.append(size / MB / took)
                        label = "Redis SET+GET" if kind == "redis" else "managers set+get"
                        self.record(
                            measure, label, "MB/s", summarize(rates), "A's write plus B's read"
                        )
            for kind in self.peers:
                with contextlib.suppress(Exception):
                    a.call("peer_delete", kind=kind, port=self.peer_port(kind), key="big")
        finally:
            self.stop(loader, a, b)

    # -- 5. many members on one loader -----------------------------------------------------

    def many(self) -> None:
        processes, per = self.sizes.many
        total = processes * per
        self.say(f"{total} members on one loader ...")
        loader = self.loader("many-loader")
        workers: list[Child] = []
        try:
            measure = f"{total} members on one loader"
            with self.attempt(measure, "clustorage"):
                start = time.perf_counter()
                for p in range(processes):
                    names = tuple(f"p{p}-n{i}" for i in range(per))
                    workers.append(self.worker(f"many-{p}", loader, names))
                for child in workers:
                    child.recv(300)
                seen = workers[0].call("nodes_seen")
                up = time.perf_counter() - start
                note = f"{processes} processes x {per} Node objects, each its own connection"
                self.record(
                    measure + ": all connected",
                    "clustorage",
                    "s",
                    summarize([up]),
                    f"{seen - 1}/{total} members seen; " + note,
                    target=f"{total} connected",
                    verdict=verdict(seen == total + 1),
                )
                stats = workers[0].call(
                    "define", iterations=self.sizes.many_define, expect=total + 1, timeout=600
                )
                acked = stats.pop("acknowledged_by")
                self.record(
                    measure + ": define acked by all",
                    "clustorage define",
                    "s",
                    stats,
                    f"acked by {acked}/{total + 1} nodes",
                    target="<= 50 ms",
                    verdict=verdict(stats["median"] <= 0.05 and not stats["short"]),
                )
                time.sleep(1.0)
                rss = rss_bytes(loader.pid)
                self.record(
                    measure + ": loader RSS",
                    "clustorage loader",
                    "B",
                    summarize([rss]),
                    "idle, after the defines",
                    target="<= 150 MB",
                    verdict=verdict(rss <= 150 * MB),
                )
            for kind in self.peers:
                with self.attempt(measure + ": server RSS", self.peer_label(kind)):
                    for child in workers:
                        child.call("peer_hold", kind=kind, port=self.peer_port(kind), count=per)
                    time.sleep(0.5)
                    server = self.redis_server if kind == "redis" else self.manager_server
                    label = "redis-server" if kind == "redis" else "managers server process"
                    self.record(
                        measure + ": loader RSS",
                        label,
                        "B",
                        summarize([rss_bytes(server.pid)]),
                        f"{total} clients connected",
                    )
        finally:
            self.stop(loader, *workers)

    # -- 6. ipyparallel --------------------------------------------------------------------

    def ipyparallel(self) -> None:
        if not self.has_ipp:
            return
        sizes = self.sizes
        self.say(f"ipyparallel: {sizes.ipp_up} engines up, push+call on {sizes.ipp_push} ...")
        child = self.worker("ipyparallel")
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
            self.strays.update(pid for pid in pids if pid)
            self.record(
                f"cluster of {sizes.ipp_up} up and connected",
                "ipyparallel",
                "s",
                result["up"],
                f"Cluster(n={sizes.ipp_up}).start_and_connect_sync, engines as local processes",
            )
            for n, stats in result["push_call"].items():
                self.record(
                    f"define, acked by all: N={n}",
                    "ipyparallel push+call",
                    "s",
                    stats,
                    "view.push(block=True) then view.execute(block=True)",
                )
            self.single(
                "idle RSS of a member process",
                "ipyparallel engine",
                "B",
                rss_bytes(result["engine_pids"][0]),
                "one engine, idle",
            )
            child.call("ipyparallel_stop", timeout=120)
        except Exception as exc:
            self.failed("ipyparallel", "ipyparallel", exc)
        finally:
            self.stop(child)

    # -- output ----------------------------------------------------------------------------

    def run(self) -> None:
        self.start_peers()
        for note in self.notes:
            self.say(note)
        for phase in (
            self.imports,
            self.cluster_of_three,
            self.hit_script,
            self.main_cluster,
            self.many,
            self.transfer,
            self.ipyparallel,
        ):
            try:
                phase()
            except Exception as exc:
                self.failed(phase.__name__, "clustorage", exc)


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def fmt_time(seconds: float) -> str:
    if seconds != seconds:
        return "-"
    magnitude = abs(seconds)
    if magnitude < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if magnitude < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if magnitude < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt(value: float, unit: str) -> str:
    if value != value:
        return "-"
    if unit == "s":
        return fmt_time(value)
    if unit == "B":
        return f"{value / MB:.1f} MB"
    if unit == "MB/s":
        return f"{value:.0f} MB/s"
    if unit == "/s":
        return f"{value:,.0f}/s"
    return f"{value:g}"


def order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped by measure, in the order each measure first appeared."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in records:
        groups.setdefault(row["measure"], []).append(row)
    return [row for rows in groups.values() for row in rows]


def table(records: list[dict[str, Any]]) -> str:
    lines = [HEADER, "-" * len(HEADER)]
    previous = None
    for row in order(records):
        unit = row["unit"]
        if row["measure"] != previous:
            lines.append(row["measure"])
            previous = row["measure"]
        system = "  " + row["system"]
        if unit == "error":
            verdict_text = f"  MISSED ({row['target']})" if row.get("verdict") else ""
            lines.append(f"{system:<38} {row['note']}{verdict_text}")
            continue
        spread = "" if row["n"] <= 1 else f"{fmt(row['min'], unit)} - {fmt(row['max'], unit)}"
        p99 = "" if row["n"] <= 1 else fmt(row["p99"], unit)
        line = f"{system:<38} {fmt(row['median'], unit):>11} {spread:>25} {p99:>11}"
        if row.get("verdict"):
            line += f"  {row['verdict'].upper()} ({row['target']})"
        lines.append(line.rstrip())
        if row.get("note"):
            lines.append(f"      {row['note']}")
    return "\n".join(lines)


def summary(records: list[dict[str, Any]]) -> str:
    lines = ["targets:"]
    for row in records:
        if row.get("verdict"):
            figure = "failed" if row["unit"] == "error" else fmt(row["median"], row["unit"])
            lines.append(
                f"  {row['verdict'].upper():<7} {row['measure']} / {row['system']}: "
                f"{figure} (target {row['target']})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and counts, to check that the bench runs"
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="where to write the results (default bench/results.json, "
        "bench/results-quick.json with --quick)",
    )
    parser.add_argument(
        "--no-ipyparallel",
        action="store_true",
        help="leave ipyparallel out even when it is installed",
    )
    args = parser.parse_args(argv)
    bench = Bench(args)
    if args.no_ipyparallel and bench.has_ipp:
        bench.has_ipp = False
        bench.notes.append("ipyparallel: left out (--no-ipyparallel)")
    started = time.perf_counter()
    bench.say(
        f"clustorage bench{' (quick)' if args.quick else ''}: Python {platform.python_version()}"
        f", {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    )
    try:
        bench.run()
    except KeyboardInterrupt:
        bench.say("interrupted; stopping everything this run started")
        return 130
    finally:
        bench.cleanup()
    elapsed = time.perf_counter() - started
    print()
    print(table(bench.records))
    print()
    print(summary(bench.records))
    path = (
        Path(args.json)
        if args.json
        else HERE / ("results-quick.json" if args.quick else "results.json")
    )
    path.write_text(
        json.dumps(
            {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "quick": args.quick,
                "seconds": elapsed,
                "notes": bench.notes,
                "results": order(bench.records),
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    print(f"\n{len(bench.records)} figures in {elapsed:.0f}s; JSON in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
