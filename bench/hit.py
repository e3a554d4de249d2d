"""Hit latency: ``get``/``call`` of an entry already in the local replica, against a dict lookup.

Run: .venv/bin/python bench/hit.py [--quick]
Prints nanoseconds per operation (best of several repeats) and the overhead over the baseline,
all measured in this one process.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from typing import Any

import clustorage


def best_ns(statement: Any, number: int, repeat: int) -> float:
    """The fastest of ``repeat`` runs of ``number`` calls, in ns per call."""
    return min(timeit.repeat(statement, number=number, repeat=repeat)) / number * 1e9


def measure(number: int, repeat: int) -> dict[str, float]:
    node = clustorage.start(name="bench", listen="127.0.0.1:0", data=":memory:", cookie="bench")
    try:
        node.get("hello", lambda: "world")
        node.call("add", [1, 2], "lambda a, b: a + b")
        table = {"hello": "world"}
        add = node.function("add")

        def dict_get(key: str) -> Any:
            return table[key]

        results = {
            "dict lookup in a function": best_ns(lambda: dict_get("hello"), number, repeat),
            "Node.get hit": best_ns(lambda: node.get("hello"), number, repeat),
            "clustorage.get hit": best_ns(lambda: clustorage.get("hello"), number, repeat),
            "plain call of add": best_ns(lambda: add(1, 2), number, repeat),
            "Node.call hit": best_ns(lambda: node.call("add", (1, 2)), number, repeat),
            "clustorage.call hit": best_ns(lambda: clustorage.call("add", (1, 2)), number, repeat),
        }
    finally:
        clustorage.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few iterations (for the tests)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    number, repeat = (2_000, 2) if args.quick else (500_000, 7)
    results = measure(number, repeat)
    base_get = results["dict lookup in a function"]
    base_call = results["plain call of add"]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'operation':<28} {'ns/op':>8} {'overhead':>10}")
    for name, ns in results.items():
        base = base_call if "call" in name else base_get
        print(f"{name:<28} {ns:8.1f} {ns - base:+9.1f}ns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
