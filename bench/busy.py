"""A busy loader still serves: a trivial miss while the loader commits a big value or
compiles a definition that sleeps at import, beside the same miss on an idle loader.

SPEC "The loader never stalls": a slow write or definition delays only the requests that
wait on it. Everything runs in one invocation against one durable loader (a temporary data
directory), so the figures compare: the misses are timed in this process, the big put and
the slow definition come from a second member process.

    .venv/bin/python bench/busy.py            # a 500 MB value, a definition sleeping 3 s
    .venv/bin/python bench/busy.py --quick    # 20 MB and 0.5 s, for the tests
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import start_loader, stop_process, summarize

import clustorage

BUSY_MEMBER = """
import sys, time, clustorage
node = clustorage.Node("busy", sys.argv[1])
print("ready", flush=True)
for what in sys.stdin:
    start = time.perf_counter()
    if what.strip() == "put":
        node.put("big", bytes(int(sys.argv[2])))
    else:
        source = f"import time\\ntime.sleep({sys.argv[3]})\\ndef slow():\\n    return 1\\n"
        node.define("slow", source)
    print(f"done {time.perf_counter() - start:.3f}", flush=True)
"""


def misses(node: clustorage.Node, until: Any, prefix: str) -> list[float]:
    """Time trivial misses (new keys) until ``until()`` is true; seconds each."""
    samples: list[float] = []
    while not until():
        key = f"{prefix}{len(samples)}"
        start = time.perf_counter()
        node.get(key, lambda: 1)
        samples.append(time.perf_counter() - start)
    return samples


def while_busy(node: clustorage.Node, member: subprocess.Popen[str], what: str) -> list[float]:
    """Misses timed from the moment ``member`` starts ``what`` until it reports done."""
    assert member.stdin is not None and member.stdout is not None
    member.stdin.write(what + "\n")
    member.stdin.flush()
    os.set_blocking(member.stdout.fileno(), False)
    answer: list[str] = []

    def finished() -> bool:
        line = member.stdout.readline() if member.stdout else ""
        if line:
            answer.append(line)
        return bool(answer) or member.poll() is not None

    samples = misses(node, finished, f"{what}-")
    if not answer or not answer[0].startswith("done"):
        raise RuntimeError(f"the busy member failed: {answer}")
    print(f"    the {what} itself took {float(answer[0].split()[1]):.2f} s")
    return samples


def line(label: str, samples: list[float]) -> None:
    stats = summarize(samples)
    print(
        f"  {label:<44} median {stats['median'] * 1e6:7.0f} µs   p99 "
        f"{stats['p99'] * 1e3:7.2f} ms   max {stats['max'] * 1e3:7.1f} ms   n={stats['n']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small value, a short sleep")
    args = parser.parse_args(argv)
    size = (20 if args.quick else 500) * 10**6
    sleep = 0.5 if args.quick else 3.0
    env = dict(os.environ, CLUSTORAGE_COOKIE=secrets.token_hex(16))
    os.environ["CLUSTORAGE_COOKIE"] = env["CLUSTORAGE_COOKIE"]
    with tempfile.TemporaryDirectory() as data:
        log = Path(data) / "loader.log"
        with open(log, "w") as stderr:
            address, loader = start_loader(env, data=str(Path(data) / "store"), stderr=stderr)
        member = subprocess.Popen(
            [sys.executable, "-c", BUSY_MEMBER, address, str(size), str(sleep)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert member.stdout is not None
            if member.stdout.readline().strip() != "ready":
                raise RuntimeError("the busy member did not start")
            with clustorage.Node("timer", address) as node:
                warm = misses_for(node, 0.5, "warm-")
                idle = misses_for(node, 1.0 if args.quick else 3.0, "idle-")
                print(f"miss on a durable loader (trivial fn), {len(warm)} warm-up misses first")
                line("idle loader", idle)
                committing = while_busy(node, member, "put")
                line(f"while it commits a {size // 10**6} MB value", committing)
                compiling = while_busy(node, member, "define")
                line(f"while it compiles a definition sleeping {sleep:g} s", compiling)
                idle_median = summarize(idle)["median"]
                for label, samples in (("commit", committing), ("compile", compiling)):
                    ratio = summarize(samples)["median"] / idle_median
                    print(f"  busy/idle median, {label}: {ratio:.2f}")
                dropped = [text for text in log.read_text().splitlines() if "left" in text]
                print(f"  nodes that left meanwhile: {len(dropped)}")
        finally:
            stop_process(member)
            stop_process(loader)
    return 0


def misses_for(node: clustorage.Node, seconds: float, prefix: str) -> list[float]:
    end = time.monotonic() + seconds
    return misses(node, lambda: time.monotonic() > end, prefix)


if __name__ == "__main__":
    sys.exit(main())
