"""What several measures do with worker processes: give one a node on another loader, and
move a value from one to another."""

from __future__ import annotations

from typing import Any

from children import BenchError, Child, Loader
from report import MB


def join(member: Child, loader: Loader, system: str) -> None:
    """Give ``member`` a node on ``loader`` (once), measured as ``system``."""
    if system not in member.joined:
        name = f"{member.label}-{system}"
        member.call("join", loader=loader.address, name=name, system=system, wait=60.0)
        member.joined.add(system)


def transfers(
    a: Child, b: Child, system: str, key: str, size: int, repeats: int
) -> tuple[list[float], list[float]]:
    """MB/s from A's put of its prepared value until B has it (its replica installed it and
    B's get returned), and until A's put returned; ``repeats`` transfers after one that warms
    up and is not counted. B must watch ``key`` on ``system``."""
    rates, returns = [], []
    for repeat in range(repeats + 1):
        sent: dict[str, Any] = a.call("put", key=key, system=system, timeout=300)
        arrived = b.call(
            "watched", key=key, version=sent["version"], wait=120.0, system=system, timeout=300
        )
        if arrived["size"] != size:
            raise BenchError(f"B got {arrived['size']} bytes, not {size}")
        if repeat:
            rates.append(size / MB / (arrived["got"] - sent["start"]))
            returns.append(size / MB / (sent["end"] - sent["start"]))
    return rates, returns
