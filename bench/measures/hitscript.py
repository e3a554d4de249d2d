"""bench/hit.py's figures: best of several timeit runs, no per-op timer cost."""

from __future__ import annotations

import json
import subprocess
import sys

from children import HERE, BenchError
from harness import Bench

MEASURE = "hit (bench/hit.py, timeit best)"


def run(bench: Bench) -> None:
    script = HERE / "hit.py"
    if not script.exists():
        return
    bench.say("bench/hit.py ...")
    with bench.attempt(MEASURE, "clustorage"):
        argv = [sys.executable, str(script), "--json", *(["--quick"] if bench.quick else [])]
        out = subprocess.run(
            argv, env=bench.env, cwd=bench.tmp, capture_output=True, text=True, timeout=300
        )
        if out.returncode != 0:
            raise BenchError(f"bench/hit.py exited {out.returncode}: {out.stderr[-1000:]}")
        for name, ns in json.loads(out.stdout).items():
            bench.single(
                MEASURE, name, "s", ns / 1e9, "in-process loader node; ns per op, best of repeats"
            )
