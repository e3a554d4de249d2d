"""What the magics return for display: source as code, the cluster's status as a table."""

from __future__ import annotations

import html
import time
from typing import Any

from clustorage import Definition

__all__ = ["ClusterStatus", "SourceText", "describe"]


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def describe(definition: Definition) -> str:
    """One line about a definition: its version and where it is loaded."""
    name, version = definition.name, definition.version
    if not definition.changed:
        return f"{name} v{version} unchanged (same source)"
    where = ", ".join(definition.installed) or "no node"
    text = f"{name} v{version} loaded on {where}"
    if definition.missing:
        text += (
            f"; not installed on {', '.join(definition.missing)} (it could not load it, or "
            "did not answer in time: its log says which)"
        )
    return text


class SourceText(str):
    """A function's source: shown as code (Markdown in notebooks), not as a quoted string."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.rstrip("\n"))

    def _repr_markdown_(self) -> str:
        return f"```python\n{self.rstrip()}\n```"


def duration(seconds: float) -> str:
    """``5s``, ``2m 05s``, ``2h 01m``, ``1d 01h``."""
    seconds = max(int(seconds), 0)
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


NO_NODES = "no nodes known: the loader does not answer"

# Inline styles, which notebooks keep (JupyterLab right-aligns table cells by default):
# names and words to the left, numbers to the right, no cell wrapped.
_LEFT = ' style="text-align: left; white-space: nowrap"'
_RIGHT = ' style="text-align: right; white-space: nowrap"'


class ClusterStatus:
    """``%cluster_status``: a text table in terminals, an HTML table in notebooks.

    Args:
        status: what :meth:`Node.status` returned.
        now: the time to measure "connected for" against (default: now).
    """

    HEADER = ("node", "role", "address", "connected for")
    NUMERIC = (False, False, False, True)

    def __init__(self, status: dict[str, Any], now: float | None = None) -> None:
        self.status = status
        self.now = time.time() if now is None else now

    def summary(self) -> str:
        status = self.status
        state = "connected" if status.get("connected") else "not connected"
        verb = "is the loader" if status.get("role") == "loader" else "is a member"
        counts = f"{plural(status.get('keys', 0), 'key')}, "
        counts += plural(status.get("functions", 0), "function")
        return f"{status.get('name')} {verb} of {status.get('loader')} ({state}); {counts}"

    def rows(self) -> list[tuple[str, str, str, str]]:
        rows = []
        for entry in self.status.get("nodes", []):
            name = str(entry.get("name", "?"))
            if name == self.status.get("name"):
                name += " (this node)"
            since = entry.get("connected_since")
            rows.append(
                (
                    name,
                    str(entry.get("role", "")),
                    str(entry.get("address", "")),
                    duration(self.now - since) if since else "",
                )
            )
        return rows

    def __repr__(self) -> str:
        lines = [self.summary()]
        rows = self.rows()
        if not rows:
            return "\n".join([*lines, f"  ({NO_NODES})"])
        table = [self.HEADER, *rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(self.HEADER))]
        for row in table:
            cells = (
                cell.rjust(w) if numeric and row is not self.HEADER else cell.ljust(w)
                for cell, w, numeric in zip(row, widths, self.NUMERIC, strict=True)
            )
            lines.append("  " + "  ".join(cells).rstrip())
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def _repr_html_(self) -> str:
        # The summary is a paragraph above the table: a caption is held to the table's
        # width and wraps.
        esc = html.escape
        summary = f"<p>{esc(self.summary())}</p>"
        rows = self.rows()
        if not rows:
            return f'<div class="clustorage-status">{summary}<p><em>{esc(NO_NODES)}</em></p></div>'

        def cells(row: tuple[str, ...], tag: str) -> str:
            return "".join(
                f"<{tag}{_RIGHT if numeric else _LEFT}>{esc(cell)}</{tag}>"
                for cell, numeric in zip(row, self.NUMERIC, strict=True)
            )

        body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
        return (
            f'<div class="clustorage-status">{summary}<table>'
            f"<thead><tr>{cells(self.HEADER, 'th')}</tr></thead><tbody>{body}</tbody></table></div>"
        )
