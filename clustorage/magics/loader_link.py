"""The library's log records about a member's link to its loader, left out where a
front-end says the same thing in its own words (the shell's notices, ``%cluster_start``).

The member client tags them with a ``loader_link`` attribute: ``"unreachable"`` when a node
starts without reaching its loader, ``"lost"`` when a connection to it ends; and ``node``,
the name of the node whose link it is.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ["LINK_LOGGER", "LOST", "UNREACHABLE", "LeaveOut", "leaving_out"]

LINK_LOGGER = "clustorage.member"  # the logger of the member client, which tags them
UNREACHABLE = "unreachable"
LOST = "lost"


class LeaveOut(logging.Filter):
    """A filter for :data:`LINK_LOGGER` that leaves out the link records of ``kinds``; of
    node ``node`` only, when set (other nodes of the process are no front-end's to tell of:
    their records stay)."""

    def __init__(self, *kinds: str, node: str | None = None) -> None:
        super().__init__()
        self.kinds = frozenset(kinds)
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "loader_link", None) not in self.kinds:
            return True
        return self.node is not None and getattr(record, "node", None) != self.node

    def install(self) -> None:
        logging.getLogger(LINK_LOGGER).addFilter(self)

    def uninstall(self) -> None:
        logging.getLogger(LINK_LOGGER).removeFilter(self)


@contextlib.contextmanager
def leaving_out(*kinds: str) -> Iterator[None]:
    """Within the block, the link records of ``kinds`` are left out: the caller says them."""
    left_out = LeaveOut(*kinds)
    left_out.install()
    try:
        yield
    finally:
        left_out.uninstall()
