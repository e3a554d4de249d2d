"""How a run's figures are written: units, the table, the verdicts on the targets."""

from __future__ import annotations

from typing import Any

MB = 1_000_000
HEADER = f"{'measure / system':<38} {'median':>11} {'min - max':>25} {'p99':>11}  target"


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
