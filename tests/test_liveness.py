"""ClosedWindow's rules, tcp_info bytes in, a verdict and socket options out: a peer whose
receive window is closed is alive while its kernel answers the window probes (SPEC "Busy is
not dead"), and dead once they go unanswered, once it has been silent past the longest gap
between probes, or once no probe can go out at all. The same with real processes:
tests/test_promises.py and tests/test_netns.py."""

from __future__ import annotations

import socket
import struct

import pytest

from clustorage import liveness
from clustorage.liveness import ClosedWindow

pytestmark = [
    pytest.mark.timeout(10),
    pytest.mark.skipif(
        getattr(socket, "TCP_INFO", None) is None or not hasattr(socket, "TCP_USER_TIMEOUT"),
        reason="tcp_info and TCP_USER_TIMEOUT are Linux's",
    ),
]

DEAD_AFTER = 3.0


def tcp_info(window: int, probes: int = 0, backoff: int = 0, silent_ms: int = 0) -> bytes:
    """The start of a struct tcp_info with the fields ClosedWindow reads."""
    info = bytearray(liveness._INFO_SIZE)
    info[liveness._PROBES] = probes
    info[liveness._BACKOFF] = backoff
    struct.pack_into("=I", info, liveness._LAST_ACK_RECV, silent_ms)
    struct.pack_into("=I", info, liveness._SND_WND, window)
    return bytes(info)


class Socket:
    """What ClosedWindow asks of a socket: its tcp_info, and the user timeout it sets."""

    def __init__(self) -> None:
        self.info = tcp_info(65535)
        self.user_timeouts: list[int] = []

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        assert (level, option) == (socket.IPPROTO_TCP, socket.TCP_INFO)
        return self.info[:size]

    def setsockopt(self, level: int, option: int, value: int) -> None:
        assert (level, option) == (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
        self.user_timeouts.append(value)


def watched() -> tuple[Socket, ClosedWindow]:
    sock = Socket()
    return sock, ClosedWindow(sock, DEAD_AFTER)  # type: ignore[arg-type]


def test_an_open_window_is_alive_and_keeps_the_user_timeout() -> None:
    sock, window = watched()
    assert window.alive(0.0) and window.alive(100.0)
    assert sock.user_timeouts == []


def test_a_closed_window_lifts_the_user_timeout_until_it_opens_again() -> None:
    sock, window = watched()
    sock.info = tcp_info(0, probes=1, silent_ms=500)
    assert window.alive(0.0)
    assert sock.user_timeouts == [0]
    sock.info = tcp_info(4096)
    assert window.alive(1.0)
    assert sock.user_timeouts == [0, int(DEAD_AFTER * 1000)]


def test_probes_answered_keep_a_closed_window_alive_however_long() -> None:
    """The kernel counts unanswered probes; an answered one sets the count back to 0."""
    sock, window = watched()
    for second in range(100):
        sock.info = tcp_info(0, probes=second % 2, backoff=3, silent_ms=1000)
        assert window.alive(float(second))


def test_probes_unanswered_for_dead_after_are_death() -> None:
    sock, window = watched()
    sock.info = tcp_info(0, probes=1, backoff=1, silent_ms=1000)
    assert window.alive(10.0)
    sock.info = tcp_info(0, probes=3, backoff=3, silent_ms=3000)
    assert window.alive(10.0 + DEAD_AFTER - 0.5)
    assert not window.alive(10.0 + DEAD_AFTER)


def test_a_peer_silent_past_the_longest_probe_gap_is_dead() -> None:
    """Probes back off to one per two minutes; silence beyond that is death, whatever the
    count of unanswered probes (here 0: it just went out again)."""
    sock, window = watched()
    sock.info = tcp_info(0, probes=0, backoff=7, silent_ms=int(liveness._LONGEST_PROBE_GAP * 1000))
    assert not window.alive(0.0)
    sock.info = tcp_info(0, probes=0, backoff=7, silent_ms=120_000)
    assert window.alive(1.0)


def test_no_probe_going_out_and_silence_for_dead_after_is_death() -> None:
    """No probe counted, no backoff: none could be sent (a local error, the route gone)."""
    sock, window = watched()
    sock.info = tcp_info(0, probes=0, backoff=0, silent_ms=2000)
    assert window.alive(0.0)
    sock.info = tcp_info(0, probes=0, backoff=0, silent_ms=int(DEAD_AFTER * 1000))
    assert not window.alive(1.0)


def test_a_short_tcp_info_is_no_verdict() -> None:
    """A kernel whose tcp_info ends before the window field: nothing to go by."""
    sock, window = watched()
    sock.info = tcp_info(0, probes=5, silent_ms=500_000)[: liveness._SND_WND]
    assert window.alive(0.0) and window.alive(1000.0)
    assert sock.user_timeouts == []
