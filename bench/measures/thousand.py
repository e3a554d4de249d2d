"""A thousand members on one durable loader: M processes x K Node objects (10 x 100; 200
members with --quick). Each phase has a time budget; a phase that overruns it is recorded as
missed ("did not finish in X s") and the scenario goes on, so that it ends in bounded time
however slowly the cluster copes.

Phases: all joined; define acknowledged by all; a trivial miss from one more member; the
loader's RSS; a big value put with everyone connected (the put's return, the bytes the loader
sent meanwhile) and a member's first get of it."""

from __future__ import annotations

import contextlib
import subprocess
import time
from typing import Any

from benchlib import summarize, tcp_bytes_sent
from children import BenchError, Child, Loader
from harness import Bench
from report import MB, fmt, verdict

PROBE = 2 * MB  # over the default eager_limit (1 MiB): announced, not pushed, on demand


def run(bench: Bench) -> None:
    processes, per = bench.sizes.thousand
    total = processes * per
    measure = f"{total} members on one loader"
    bench.say(f"{total} members ({processes} processes x {per} nodes) on one durable loader ...")
    loader = bench.loader("thousand-loader")
    workers: list[Child] = []
    extra: Child | None = None
    try:
        join_all(bench, loader, workers, measure)
        before = cpu_split(loader, workers)
        defines(bench, workers[0], measure, total)
        record_cpu(bench, measure + ": define acked by all", "define", before, loader, workers)
        extra = bench.worker("thousand-extra", loader, ("extra",))
        extra.recv(60)
        before = cpu_split(loader, workers)
        misses(bench, extra, measure)
        record_cpu(
            bench, measure + ": trivial miss from one more member", "miss", before, loader, workers
        )
        bench.loader_rss(loader, measure, "after the defines and misses", 200)
        big_value(bench, loader, extra, workers[:GETTERS], measure, total)
    except Exception as exc:
        bench.failed(measure, "clustorage", exc)
    finally:
        leave_together([*workers, *([extra] if extra else [])])
        bench.stop(loader, *workers, *([extra] if extra else []))


def cpu_split(loader: Loader, workers: list[Child]) -> tuple[float, float] | None:
    """CPU seconds used so far by the loader and by the member processes together (None
    without psutil)."""
    try:
        import psutil
    except ImportError:
        return None

    def used(pid: int) -> float:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    return used(loader.pid), sum(used(child.pid) for child in workers)


def record_cpu(
    bench: Bench,
    name: str,
    what: str,
    before: tuple[float, float] | None,
    loader: Loader,
    workers: list[Child],
) -> None:
    """The loader's and the member processes' CPU per ``what`` since ``before``."""
    after = cpu_split(loader, workers)
    count = bench.sizes.thousand_define
    if what == "miss":  # with the worker's warm-up
        count = bench.sizes.thousand_miss + min(50, bench.sizes.thousand_miss)
    if before is None or after is None:
        return
    plural = "misses" if what == "miss" else what + "s"
    note = f"CPU time over the phase / {count} {plural} (psutil)"
    bench.single(name, f"loader CPU, per {what}", "s", (after[0] - before[0]) / count, note)
    bench.single(name, f"members' CPU, per {what}", "s", (after[1] - before[1]) / count, note)


def leave_together(children: list[Child], wait: float = 10.0) -> None:
    """Ask every member process to leave at once and give them ``wait`` seconds in all;
    whoever is still there is then stopped by its PID."""
    for child in children:
        with contextlib.suppress(Exception):
            child.send("exit")
    deadline = time.monotonic() + wait
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(max(0.0, deadline - time.monotonic()))


def join_all(bench: Bench, loader: Loader, workers: list[Child], measure: str) -> int:
    """Start the member processes at once, each starting its nodes one after another; how
    many joined within the budget."""
    processes, per = bench.sizes.thousand
    total = processes * per
    budget = bench.sizes.thousand_join_budget
    name = measure + ": all joined"
    start = time.perf_counter()
    for p in range(processes):
        names = tuple(f"p{p}-n{i}" for i in range(per))
        options = ["--budget", str(budget), "--timeout", str(budget)]
        workers.append(bench.worker(f"thousand-{p}", loader, names, options))
    joined = 0
    for child in workers:
        answer = child.recv(max(1.0, budget + 30 - (time.perf_counter() - start)))
        joined += answer["joined"]
    seconds = time.perf_counter() - start
    note = (
        f"{processes} processes at once x {per} Node objects one after another, "
        "each its own connection"
    )
    if joined < total:
        bench.record(
            name,
            "clustorage",
            "error",
            summarize([]),
            f"missed, did not finish in {budget:g} s: {joined}/{total} joined; {note}",
            target="<= 5 s",
            verdict="missed",
        )
    else:
        bench.record(
            name,
            "clustorage",
            "s",
            summarize([seconds]),
            "spawn of the member processes until each node is connected; " + note,
            target="<= 5 s",
            verdict=verdict(seconds <= 5.0),
        )
    return joined


def defines(bench: Bench, definer: Child, measure: str, total: int) -> None:
    budget = bench.sizes.thousand_phase_budget
    iterations = bench.sizes.thousand_define
    name = measure + ": define acked by all"
    with bench.attempt(name, "clustorage define", "<= 50 ms"):
        stats = definer.call(
            "define", iterations=iterations, expect=total + 1, budget=budget, timeout=budget + 30
        )
        acked = stats.pop("acknowledged_by")
        note = f"acked by {acked}/{total + 1} nodes"
        if stats["done"] < iterations:
            note += (
                f"; missed, did not finish in {budget:g} s: {stats['done']}/{iterations} defines"
            )
        ok = stats["median"] <= 0.05 and not stats["short"] and stats["done"] == iterations
        bench.record(
            name, "clustorage define", "s", stats, note, target="<= 50 ms", verdict=verdict(ok)
        )


def misses(bench: Bench, extra: Child, measure: str) -> None:
    budget = bench.sizes.thousand_phase_budget
    name = measure + ": trivial miss from one more member"
    with bench.attempt(name, "clustorage Node.get", "<= 1 ms"):
        stats = extra.call(
            "misses",
            iterations=bench.sizes.thousand_miss,
            prefix="thousand",
            peers={},
            budget=budget,
            timeout=budget + 30,
        )
        rounds = stats.pop("rounds")
        ours = stats["clustorage"]
        if "error" in ours:
            raise BenchError(ours["error"])
        note = "get(fresh_key, lambda: i) on the durable store"
        if rounds["done"] < rounds["of"]:
            note += (
                f"; missed, did not finish in {budget:g} s: {rounds['done']}/{rounds['of']} rounds"
            )
        bench.record(
            name,
            "clustorage Node.get",
            "s",
            ours,
            note,
            target="<= 1 ms median",
            verdict=verdict(ours["median"] <= 1e-3 and rounds["done"] == rounds["of"]),
        )


GETTERS = 3  # members that get the big value, one after another: one get is a noisy figure


def sent_during(loader: Loader, action: Any, settle: float) -> tuple[Any, int | None]:
    """``action()``'s result and the bytes the loader sent to its members from just before
    it until ``settle`` seconds after it returned."""
    before = tcp_bytes_sent(loader.port)
    result = action()
    time.sleep(settle)
    after = tcp_bytes_sent(loader.port)
    sent = None if before is None or after is None else after - before
    return result, sent


def big_value(
    bench: Bench, loader: Loader, putter: Child, getters: list[Child], measure: str, total: int
) -> None:
    """A probe value a little over eager_limit first: if the loader pushes it to every node,
    the big value (total x its size of memory in the members) is not put."""
    size = bench.sizes.thousand_value
    budget = bench.sizes.thousand_phase_budget
    name = f"{measure}: {size // MB} MB value"
    settle = 2 * bench.sizes.settle
    putter.call("make_value", size=PROBE)
    _, probe_sent = sent_during(
        loader, lambda: putter.call("put", key="probe", timeout=budget), settle
    )
    if probe_sent is None:
        bench.notes.append(f"{name}: bytes sent not measured - 'ss' (iproute2) is not installed")
    else:
        bench.single(
            name,
            f"loader sent, for a {PROBE // MB} MB put",
            "B",
            probe_sent,
            f"bytes on the loader's connections from the put to {settle:g} s after it; "
            f"{total} members",
        )
        if probe_sent >= total * PROBE // 4:
            bench.record(
                name,
                "clustorage put",
                "error",
                summarize([]),
                f"not put: the {PROBE // MB} MB probe went to every member ({fmt(probe_sent, 'B')}"
                f" sent), so {size // MB} MB would need {fmt(total * size, 'B')} in the members",
                target="the put returns, no byte to members that never get it",
                verdict="missed",
            )
            bench.record(
                name,
                "a member's first get",
                "error",
                summarize([]),
                "not measured: the value was not put",
                target=">= 800 MB/s",
                verdict="missed",
            )
            return
    with bench.attempt(name, "clustorage put", "the put returns"):
        putter.call("make_value", size=size, timeout=120)
        sent, loader_sent = sent_during(
            loader, lambda: putter.call("put", key="big", timeout=budget), settle
        )
        seconds = sent["end"] - sent["start"]
        bench.single(name, "clustorage put returns", "s", seconds, f"{total} members connected")
        if loader_sent is not None:
            bench.record(
                name,
                "loader sent, for the put",
                "B",
                summarize([loader_sent]),
                f"bytes on the loader's connections from the put to {settle:g} s after it",
                target="< 1 copy: none to members that never get it",
                verdict=verdict(loader_sent < size),
            )
    with bench.attempt(name, "a member's first get", ">= 800 MB/s"):
        rates = []
        for getter in getters:
            got = getter.call("get_timed", key="big", timeout=budget)
            if got["size"] != size:
                raise BenchError(f"the member got {got['size']} bytes, not {size}")
            rates.append(size / MB / got["seconds"])
        stats = summarize(rates)
        bench.record(
            name,
            "a member's first get",
            "MB/s",
            stats,
            f"get(key) in {len(getters)} members of as many processes, one after another, "
            "each its first of that value",
            target=">= 800 MB/s",
            verdict=verdict(stats["median"] >= 800),
        )
