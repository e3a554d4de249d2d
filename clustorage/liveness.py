"""How a connection's death is noticed: by the operating system, never by Python code.

SPEC "Busy is not dead": a node whose Python code holds the GIL for minutes (a long C call,
a slow import) or is stopped still has a kernel that answers TCP keepalive probes, so it
keeps its connection and its leases. A process that dies has its sockets closed by the
kernel: noticed at once. A host that stops answering: keepalive probes (when idle) or the
unacknowledged data of a send (``TCP_USER_TIMEOUT``) give up after ``dead_after`` seconds.

A peer that stops reading while it is sent to (busy, or stopped) has its window closed by its
kernel, which answers the sender's window probes. Linux gives such a connection up after
``TCP_USER_TIMEOUT`` all the same; :class:`ClosedWindow` lifts that timeout while the
window is closed and the probes are answered, and tells when they go unanswered.
"""

from __future__ import annotations

import logging
import socket
import struct

from .config import DEAD_AFTER

__all__ = ["DEAD_AFTER", "ClosedWindow", "keepalive_settings", "watch"]

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


_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)
_TCP_INFO = getattr(socket, "TCP_INFO", None)
# struct tcp_info (linux/tcp.h): the unanswered probes and the probe backoff (bytes), the
# milliseconds since the peer last acknowledged anything, and the peer's window.
_PROBES = 3
_BACKOFF = 4
_LAST_ACK_RECV = 56
_SND_WND = 228
_INFO_SIZE = _SND_WND + 4
# Window probes back off to one per TCP_RTO_MAX (120 s): a peer that answers them may stay
# silent that long, and one silent for longer is gone whatever the probes' count says.
_LONGEST_PROBE_GAP = 130.0


class ClosedWindow:
    """Whether a peer that closed its receive window is still there (SPEC "Busy is not
    dead"). :meth:`alive` is called at least a few times per ``dead_after``."""

    def __init__(self, sock: socket.socket, dead_after: float) -> None:
        self._sock = sock
        self._dead_after = dead_after
        self._lifted = False  # TCP_USER_TIMEOUT taken off while the window is closed
        self._unanswered_since: float | None = None

    def alive(self, now: float) -> bool:
        """False once the peer's window is closed and our probes have gone unanswered for
        ``dead_after`` seconds (``now``: time.monotonic())."""
        if _TCP_INFO is None or _USER_TIMEOUT is None:
            return True
        try:
            info = self._sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _INFO_SIZE)
        except OSError:
            return True
        if len(info) < _INFO_SIZE:  # a kernel before tcpi_snd_wnd: nothing to go by
            return True
        closed = struct.unpack_from("=I", info, _SND_WND)[0] == 0
        if closed != self._lifted:
            timeout = 0 if closed else int(self._dead_after * 1000)
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, _USER_TIMEOUT, timeout)
            except OSError as exc:
                log.debug("cannot set TCP_USER_TIMEOUT=%s: %s", timeout, exc)
                return True
            self._lifted = closed
        if not closed:
            self._unanswered_since = None
            return True
        silent = struct.unpack_from("=I", info, _LAST_ACK_RECV)[0] / 1000
        if silent >= max(self._dead_after, _LONGEST_PROBE_GAP):
            return False
        if info[_PROBES] == 0:
            self._unanswered_since = None
            # No probe has gone out (a local error: the route is gone) and nothing came in.
            return not (info[_BACKOFF] == 0 and silent >= self._dead_after)
        if self._unanswered_since is None:
            self._unanswered_since = now
        return now - self._unanswered_since < self._dead_after
