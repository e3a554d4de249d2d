"""Two versions of Clustorage side by side: the same measure, interleaved, in one invocation.

A change worth a few percent is lost in the drift of a shared machine between two runs of
run.py. This script starts a loader and its members for each source tree (a checkout, or a
``git worktree``) at once and alternates batches between them, so that both see the same
machine; it prints each tree's median batch and their ratio.

    git worktree add /tmp/before HEAD~1
    .venv/bin/python bench/ab.py /tmp/before .                  # the miss, 10 rounds
    .venv/bin/python bench/ab.py /tmp/before . --transfer       # 100 MB put, then get
    .venv/bin/python bench/ab.py /tmp/before . --transfer --kind numpy --durable
    .venv/bin/python bench/ab.py /tmp/before . --tls            # the miss over TLS
    .venv/bin/python bench/ab.py BEFORE . --writes 8            # acked puts/s, 8 writers, durable
    .venv/bin/python bench/ab.py BEFORE . --durable             # the miss on the durable store
    .venv/bin/python bench/ab.py BEFORE . --define 8            # a define acked by 8 members
    .venv/bin/python bench/ab.py . . --quick                    # the tests' check

Identical trees come out within about ±3 % for the miss on the 2-core VM the figures in
bench/README.md come from; a smaller difference needs more rounds, or is not there. With the
miss and the writes it also prints the CPU time each end spent per operation, which a busy
machine moves less than the wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from benchlib import certificates, start_loader, stop_process, tls_files

MB = 1_000_000
_BATCHES = itertools.count()

# Each member program reads a count per line and answers with one figure per line.
MISSES = r"""
import itertools, sys, time, clustorage
node = clustorage.Node("m", sys.argv[1], cookie=sys.argv[2], timeout=60)
keys = itertools.count()
node.get("warm", lambda: 0)
print("ready", flush=True)
for line in sys.stdin:
    n = int(line)
    start = time.perf_counter()
    for _ in range(n):
        i = next(keys)
        node.get(f"k{i}", lambda: i)
    print((time.perf_counter() - start) / n * 1e6, flush=True)
"""

# A fresh key each batch (the one before deleted first, so that the loader holds one value):
# values over 1 MiB travel on demand, so the reader's get fetches it, as a member's would.
# The value is bytes, a numpy array of float64 or a DataFrame of four such columns.
WRITER = r"""
import sys, time, clustorage
node = clustorage.Node("a", sys.argv[1], cookie=sys.argv[2], timeout=60)
size, kind = int(sys.argv[3]), sys.argv[4]
if kind == "bytes":
    value = b"x" * size
else:
    import numpy as np
    value = np.arange(size // 8, dtype=np.float64)
    if kind == "pandas":
        import pandas as pd
        value = pd.DataFrame(value.reshape(-1, 4), columns=list("abcd"))
previous = None
print("ready", flush=True)
for line in sys.stdin:
    if previous is not None:
        node.delete(previous)
    previous = f"big{line.strip()}"
    start = time.time()
    node.put(previous, value)
    print(start, time.time(), flush=True)
"""

READER = r"""
import sys, time, clustorage
node = clustorage.Node("b", sys.argv[1], cookie=sys.argv[2], timeout=60)
print("ready", flush=True)
for line in sys.stdin:
    start = time.time()
    value = node.get(f"big{line.strip()}")
    arrived = time.time()
    size = getattr(value, "nbytes", None)
    if hasattr(value, "memory_usage"):
        size = int(value.memory_usage(index=False).sum())
    print(start, arrived, len(value) if size is None else size, flush=True)
"""


# Acked puts in a loop over 64 keys of its own, from a start time for a while; one count per
# line. Every writer of a tree starts at once, on a durable loader, as run.py's writes do.
WRITES = r"""
import sys, time, clustorage
node = clustorage.Node(sys.argv[3], sys.argv[1], cookie=sys.argv[2], timeout=60)
node.put(f"{sys.argv[3]}-warm", 0)
print("ready", flush=True)
for line in sys.stdin:
    start_at, seconds = map(float, line.split())
    while time.time() < start_at:
        time.sleep(0.0005)
    end, count = start_at + seconds, 0
    while time.time() < end:
        node.put(f"{sys.argv[3]}-{count % 64}", count)
        count += 1
    print(count, flush=True)
"""


# The definer: a batch of defines, each acknowledged by every node, one after another; the
# median in microseconds per line. The other members only stay connected (and acknowledge).
DEFINER = r"""
import statistics, sys, time, clustorage
node = clustorage.Node("definer", sys.argv[1], cookie=sys.argv[2], timeout=60)
expect, versions = int(sys.argv[3]), iter(range(1 << 30))
print("ready", flush=True)
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        source = f"def bench_fn(x):\n    return x + {next(versions)}\n"
        start = time.perf_counter()
        definition = node.define("bench_fn", source, force=True)
        times.append(time.perf_counter() - start)
        if len(definition.installed) != expect:
            sys.exit(f"acknowledged by {len(definition.installed)} nodes, not {expect}")
    print(statistics.median(times) * 1e6, flush=True)
"""

IDLE = r"""
import sys, clustorage
node = clustorage.Node(sys.argv[3], sys.argv[1], cookie=sys.argv[2], timeout=60)
print("ready", flush=True)
sys.stdin.read()
"""


class BenchError(Exception):
    """A child process failed or did not answer."""


@dataclass
class Tree:
    """One source tree's loader and member processes."""

    path: Path
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)
    figures: list[float] = field(default_factory=list)
    cpu_per_op: list[list[float]] = field(default_factory=list)

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of the loader, and of its members together."""
        seconds = [process_cpu(process.pid) for process in self.processes]
        return seconds[0], sum(seconds[1:])

    legs: dict[str, list[float]] = field(default_factory=dict)

    def start(
        self, programs: list[tuple[str, ...]], certs: Path | None, data: str = ":memory:"
    ) -> list[subprocess.Popen[str]]:
        cookie = secrets.token_hex(16)
        env = {**os.environ, "PYTHONPATH": str(self.path), "CLUSTORAGE_COOKIE": cookie}
        address, loader = start_loader({**env, **tls_files(certs, "L")}, self.path, data)
        env.update(tls_files(certs, "member"))
        self.processes.append(loader)
        members = []
        for program, *arguments in programs:
            member = subprocess.Popen(
                [sys.executable, "-c", program, address, cookie, *arguments],
                env=env,
                cwd=self.path,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self.processes.append(member)
            if read_line(member) != ["ready"]:
                raise BenchError(f"a member in {self.path} did not start")
            members.append(member)
        return members

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.stdin is not None:
                process.stdin.close()
            stop_process(process)


def process_cpu(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_line(process: subprocess.Popen[str]) -> list[str]:
    stdout: IO[str] | None = process.stdout
    line = stdout.readline() if stdout is not None else ""
    if not line:
        raise BenchError(f"process {process.pid} ended without answering")
    return line.split()


def write_line(process: subprocess.Popen[str], text: str) -> None:
    assert process.stdin is not None
    process.stdin.write(text + "\n")
    process.stdin.flush()


def miss_batch(members: list[subprocess.Popen[str]], count: int, legs: Any) -> float:
    """Microseconds per miss over ``count`` misses."""
    (member,) = members
    write_line(member, str(count))
    return float(read_line(member)[0])


def transfer_batch(
    members: list[subprocess.Popen[str]], size: int, legs: dict[str, list[float]]
) -> float:
    """MB/s from the writer's put of a fresh key until the reader's get of it returns; each
    leg's MB/s goes to ``legs``: the put (writer to loader) and the get (loader to reader)."""
    writer, reader = members
    key = str(next(_BATCHES))
    write_line(writer, key)
    started, put = map(float, read_line(writer))
    write_line(reader, key)
    asked, arrived, got = read_line(reader)
    if int(got) != size:
        raise BenchError(f"the reader got {got} bytes, not {size}")
    legs.setdefault("put", []).append(size / MB / (put - started))
    legs.setdefault("get", []).append(size / MB / (float(arrived) - float(asked)))
    return size / MB / (float(arrived) - started)


def define_batch(members: list[subprocess.Popen[str]], count: int, legs: Any) -> float:
    """The median microseconds of ``count`` defines, each acknowledged by every node."""
    write_line(members[0], str(count))
    return float(read_line(members[0])[0])


def writes_batch(members: list[subprocess.Popen[str]], seconds: float, legs: Any) -> float:
    """Acked puts per second of every writer at once, for ``seconds``."""
    start_at = time.time() + 0.2
    for member in members:
        write_line(member, f"{start_at} {seconds}")
    return sum(int(read_line(member)[0]) for member in members) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("trees", nargs=2, type=Path, metavar="TREE", help="two source trees")
    parser.add_argument("--transfer", action="store_true", help="100 MB values, not misses")
    parser.add_argument(
        "--writes", type=int, metavar="N", help="acked puts/s of N writers, durable store"
    )
    parser.add_argument(
        "--define", type=int, metavar="N", help="a define acked by N members (and the loader)"
    )
    parser.add_argument("--durable", action="store_true", help="loaders on the durable store")
    parser.add_argument("--rounds", type=int, default=10, help="batches per tree (10)")
    parser.add_argument("--quick", action="store_true", help="tiny batches, for the tests")
    parser.add_argument("--tls", action="store_true", help="over TLS (needs clustorage[tls])")
    parser.add_argument(
        "--kind", choices=("bytes", "numpy", "pandas"), default="bytes", help="--transfer's value"
    )
    args = parser.parse_args(argv)
    with certificates(["L", "member"], args.tls) as certs:
        return run(args, certs)


def run(args: argparse.Namespace, certs: Path | None) -> int:
    rounds = 2 if args.quick else args.rounds
    if args.writes:
        size: float = 0.5 if args.quick else 3.0  # seconds per batch
        programs = [(WRITES, f"w{i}") for i in range(args.writes)]
        unit, higher_is_better = "acked puts/s", True
        batch: Any = writes_batch
    elif args.define:
        size = 5 if args.quick else 50  # defines per batch
        idle = [(IDLE, f"m{i}") for i in range(1, args.define)]
        programs = [(DEFINER, str(args.define + 1)), *idle]
        unit, higher_is_better = "us per define (median)", False
        batch = define_batch
    elif args.transfer:
        size = MB if args.quick else 100 * MB
        programs = [(WRITER, str(size), args.kind), (READER,)]
        unit, higher_is_better = "MB/s", True
        batch = transfer_batch
    else:
        size = 50 if args.quick else 2000
        programs = [(MISSES,)]
        unit, higher_is_better = "us per miss", False
        batch = miss_batch
    trees = [Tree(path.resolve()) for path in args.trees]
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [tree.stop() for tree in trees])
        members = []
        durable = args.writes or args.durable
        for tree in trees:  # a durable loader's store: a directory of its own
            data = stack.enter_context(tempfile.TemporaryDirectory()) if durable else ":memory:"
            members.append(tree.start(programs, certs, data))
        for first in (0, 1):  # one batch each to warm up, not counted
            batch(members[first], size, {})
        for round_number in range(rounds):
            order = (0, 1) if round_number % 2 == 0 else (1, 0)
            for index in order:
                before = trees[index].cpu()
                figure = batch(members[index], size, trees[index].legs)
                trees[index].figures.append(figure)
                # CPU seconds per put or miss: the loader's, the members'
                if not (args.transfer or args.define):
                    spent = [b - a for a, b in zip(before, trees[index].cpu(), strict=True)]
                    done = figure * size if args.writes else size
                    trees[index].cpu_per_op.append([s / done for s in spent])
    medians = [statistics.median(tree.figures) for tree in trees]
    for name, tree, median in zip("AB", trees, medians, strict=True):
        low, high = min(tree.figures), max(tree.figures)
        print(f"{name} {tree.path}: {median:.1f} {unit} (min {low:.1f}, max {high:.1f})")
        if tree.cpu_per_op:
            loader, writers = (
                statistics.median(c) * 1e6 for c in zip(*tree.cpu_per_op, strict=True)
            )
            if args.writes:
                print(f"  CPU per put: loader {loader:.0f} us, writers {writers:.0f} us")
            else:  # the member polls for its answers (clustorage.member.SPIN)
                print(f"  CPU per miss: loader {loader:.0f} us, member {writers:.0f} us (it polls)")
        for leg, figures in tree.legs.items():
            print(f"  {leg}: {statistics.median(figures):.1f} {unit}")
    ratio = medians[1] / medians[0]
    better = ratio > 1 if higher_is_better else ratio < 1
    print(f"B/A {ratio:.3f} ({'B better' if better else 'B not better'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
