"""Import time of each system's client module, in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

from benchlib import summarize
from harness import Bench

MEASURE = "import time (fresh interpreter)"
CODE = "import time; t = time.perf_counter(); import {m}; print(time.perf_counter() - t)"


def run(bench: Bench) -> None:
    bench.say("import times ...")
    modules = [("clustorage", "clustorage"), ("multiprocessing.managers", "managers")]
    if any(peer.kind.startswith("redis") for peer in bench.peers):
        modules.append(("redis", "Redis (redis-py)"))
    if bench.has_ipp:
        modules.append(("ipyparallel", "ipyparallel"))
    for module, label in modules:
        system = f"import {module}" if label == module else f"{label}: import {module}"
        with bench.attempt(MEASURE, system):
            samples = []
            for _ in range(bench.sizes.import_repeats):
                out = subprocess.run(
                    [sys.executable, "-c", CODE.format(m=module)],
                    env=bench.env,
                    cwd=bench.tmp,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True,
                )
                samples.append(float(out.stdout.strip().splitlines()[-1]))
            bench.record(MEASURE, system, "s", summarize(samples))
