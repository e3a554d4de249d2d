"""How a connection's death is noticed: by the operating system, never by Python code.

SPEC "Busy is not dead": a node whose Python code holds the GIL for minutes (a long C call,
a slow import) or is stopped still has a kernel that answers TCP keepalive probes, so it
keeps its connection and its leases. A process that dies has its sockets closed by the
kernel: noticed at once. A host that stops answering: keepalive probes (when idle) or the
unacknowledged data of a send (``TCP_USER_TIMEOUT``) give up after ``dead_after`` seconds.
"""

from __future__ import annotations

import logging
import socket

from .config import DEAD_AFTER

__all__ = ["DEAD_AFTER", "keepalive_settings", "watch"]

log = logging.getLogger(__name__)


def keepalive_settings(dead_after: float) -> tuple[int, int, int]:
    """(idle, interval, count) in whole seconds: a silent peer is probed after a third of
    ``dead_after``, and given up on about ``dead_after`` seconds after it went silent."""
    idle = max(1, int(dead_after / 3))
    interval = max(1, int(dead_after / 6))
    count = max(1, round((dead_after - idle) / interval))
    return idle, interval, count


def watch(sock: socket.socket, dead_after: float) -> None:
    """Have the kernel notice, within ``dead_after`` seconds, a peer host that is gone."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle, interval, count = keepalive_settings(dead_after)
    options = (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", count),
        ("TCP_USER_TIMEOUT", int(dead_after * 1000)),
    )
    for name, value in options:
        option = getattr(socket, name, None)
        if option is None:  # not on this system: keepalive's defaults apply
            continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
        except OSError as exc:
            log.debug("cannot set %s=%s: %s", name, value, exc)
