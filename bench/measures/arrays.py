"""A numpy array and a pandas DataFrame of about 100 MB from node A to node B, on
``:memory:`` and on the durable store."""

from __future__ import annotations

import importlib.util

from benchlib import summarize
from children import Child, Loader
from harness import Bench, store_label
from report import MB, verdict

from measures.nodes import transfers

TARGETS_MB_S = {"durable": 600, ":memory:": 1000}


def run(bench: Bench, a: Child, b: Child, stores: dict[str, Loader]) -> None:
    size, repeats = bench.sizes.arrays
    missing = [m for m in ("numpy", "pandas") if importlib.util.find_spec(m) is None]
    if missing:
        bench.notes.append(
            f"numpy/pandas transfer: skipped - {', '.join(missing)} not installed "
            "(scripts/bootstrap.sh bench adds them)"
        )
        return
    for kind, what in (("numpy", "numpy array"), ("pandas", "pandas DataFrame")):
        measure = f"{size // MB} MB {what} to another node"
        try:
            exact = a.call("make_value", size=size, kind=kind, timeout=120)
            for system in stores:
                b.call("watch", key=f"array-{kind}", system=system)
        except Exception as exc:
            bench.failed(measure, "clustorage", exc)
            continue
        for system, store in stores.items():
            store_name = store_label(store)
            target = TARGETS_MB_S[store_name]
            with bench.attempt(measure, f"clustorage ({store_name})", f">= {target} MB/s"):
                rates, returns = transfers(a, b, system, f"array-{kind}", exact, repeats)
                stats = summarize(rates)
                bench.record(
                    measure,
                    f"clustorage put -> B's get ({store_name})",
                    "MB/s",
                    stats,
                    f"{exact / MB:.0f} MB; A's put until B's replica has it and B's get returned",
                    target=f">= {target} MB/s",
                    verdict=verdict(stats["median"] >= target),
                )
                bench.record(
                    measure,
                    f"clustorage put, A's call ({store_name})",
                    "MB/s",
                    summarize(returns),
                    "until A's put returns",
                )
