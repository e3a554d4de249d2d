"""The loader's listening socket: it accepts connections, keeps the unauthenticated ones on
probation, and under TLS sorts out the peers that do not speak it.

Each accepted connection is a :class:`Newcomer`, on probation until its protocol vouches for
the peer (:meth:`Newcomer.trust`: the peer proved it knows the cookie). At most
``max_untrusted`` are on probation at once: each connection over that closes the oldest, so
connections that never finish their handshake cannot take the file descriptors or the loop
from members (SPEC "Wire and trust"), whose handshakes take a round trip. The handshake's
deadline runs from the accept (:attr:`Newcomer.since`), the TLS handshake included.

Under TLS the first byte decides before the TLS handshake (:mod:`~.tls_stream`): 0x16 starts
it; any other byte is refused with a log line; and a peer that sends nothing for
:data:`~.tls.SILENCE` seconds (a member without TLS waits for the loader to speak first) is
sent a TLS alert, which such a member recognises (:func:`~.tls.check_reply`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import ssl
import time
from collections.abc import Callable
from typing import cast

from . import tls, tls_stream

__all__ = ["ACCEPT_PAUSE", "Listener", "Newcomer", "untrusted_cap"]

log = logging.getLogger(__name__)

ACCEPT_PAUSE = 1.0  # after running out of file descriptors or memory
REPORT_EVERY = 10.0  # seconds between two log lines about connections closed for the cap
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def untrusted_cap() -> int:
    """How many connections may wait for their protocol's trust at once: an eighth of this
    process's file descriptors (16 to 256), so that they never take the ones members need."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 256
    return max(16, min(256, soft // 8))


ProtocolFactory = Callable[["Newcomer"], asyncio.BaseProtocol]


class Listener:
    """A listening socket on ``loop`` whose connections go to ``protocol_factory(newcomer)``.

    Args:
        handshake: seconds a connection has, from its accept, to finish its handshakes.
        context: the TLS context, or None for plaintext.
        max_untrusted: connections on probation at once (default :func:`untrusted_cap`).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        protocol_factory: ProtocolFactory,
        *,
        handshake: float,
        context: ssl.SSLContext | None = None,
        max_untrusted: int | None = None,
    ) -> None:
        self.loop = loop
        self.factory = protocol_factory
        self.handshake = handshake
        self.context = context
        self.max_untrusted = untrusted_cap() if max_untrusted is None else max_untrusted
        self.untrusted: dict[Newcomer, None] = {}  # oldest first
        self._evicted = 0
        self._reported = -REPORT_EVERY
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.socket = sock
        loop.add_reader(sock, self._accept)

    def _accept(self) -> None:
        # Fewer than the cap at a time: a connection outlives the batch that accepted it, to
        # answer its challenge, even while the cap closes the oldest.
        for _ in range(max(1, min(64, self.max_untrusted // 2))):
            try:
                sock, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    log.warning("cannot accept connections for a second: %s", exc)
                    self.loop.remove_reader(self.socket)
                    self.loop.call_later(ACCEPT_PAUSE, self._resume)
                else:
                    log.warning("accept failed: %s", exc)
                return
            while len(self.untrusted) >= self.max_untrusted:
                self._evict(next(iter(self.untrusted)))
            newcomer = Newcomer(self, sock)
            self.untrusted[newcomer] = None
            newcomer.start()

    def _evict(self, newcomer: Newcomer) -> None:
        newcomer.close()
        self._evicted += 1
        now = time.monotonic()
        if now - self._reported >= REPORT_EVERY:
            log.warning(
                "closed %d connection(s) that had not finished their handshake: over the "
                "cap of %d at once (oldest first)",
                self._evicted,
                self.max_untrusted,
            )
            self._evicted, self._reported = 0, now

    def _resume(self) -> None:
        if self.socket.fileno() != -1:
            self.loop.add_reader(self.socket, self._accept)

    def close(self) -> None:
        """Stop accepting, and close the connections still on probation."""
        if self.socket.fileno() != -1:
            self.loop.remove_reader(self.socket)
            self.socket.close()
        for newcomer in list(self.untrusted):
            newcomer.close()


class Newcomer:
    """An accepted connection on probation (see the module docstring): its socket while the
    listener peeks at it, then its transport's."""

    def __init__(self, listener: Listener, sock: socket.socket) -> None:
        self.since = time.monotonic()
        self._listener = listener
        self._loop = listener.loop
        self._sock: socket.socket | None = sock  # None once the loop has it
        self._peeking = False
        self._silence: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._closing = False  # closed while the loop took the socket: close what it made
        try:
            peer = sock.getpeername()
        except OSError:
            peer = None
        self.where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"

    def start(self) -> None:
        """Hand the connection to its protocol; under TLS, once its first byte is seen."""
        sock = self._sock
        if sock is None:
            return
        sock.setblocking(False)
        if self._listener.context is None:
            self._task = self._loop.create_task(self._open())
            return
        self._peeking = True
        self._loop.add_reader(sock, self._first_byte)
        self._silence = self._loop.call_later(tls.SILENCE, self._silent)

    def trust(self) -> None:
        """The protocol vouches for its peer: off probation."""
        self._listener.untrusted.pop(self, None)

    def gone(self) -> None:
        """The protocol's connection is lost: off probation."""
        self._listener.untrusted.pop(self, None)

    def close(self) -> None:
        """Close the connection now, whatever it waits for, and take it off probation."""
        self._listener.untrusted.pop(self, None)
        self._stop_peeking()
        if self._sock is not None:  # not handed to the loop (yet): ours to close
            self._sock.close()
            self._sock = None
        if self._task is not None and not self._task.done():
            # The protocol may have its connection already, inside the call the task waits
            # for (plaintext: cancelled then, uvloop closes the transport without
            # connection_lost), or be getting it now (TLS): the task closes it once it has it.
            self._closing = True
            if self._listener.context is not None:  # a TLS handshake under way: it ends here
                self._task.cancel()  # the loop closes what it holds of it
        elif self._transport is not None:
            self._transport.abort()

    # -- under TLS, before the handshake ----------------------------------------------------

    def _stop_peeking(self) -> None:
        if self._peeking and self._sock is not None:
            self._peeking = False
            self._loop.remove_reader(self._sock)
        if self._silence is not None:
            self._silence.cancel()
            self._silence = None

    def _silent(self) -> None:
        log.warning(
            "refused %s: it sent nothing, as a member without TLS would; this loader "
            "speaks TLS only (start members with %s)",
            self.where,
            tls.FLAGS,
        )
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.send(tls.ALERT)
        self.close()

    def _first_byte(self) -> None:
        """Start a TLS handshake; close anything else, with a log line."""
        sock = self._sock
        if sock is None:
            return
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            first = b""
        self._stop_peeking()
        if first and first[0] == tls.HANDSHAKE_RECORD:
            self._task = self._loop.create_task(self._open())
            return
        if not first:  # connected and closed: a port check, say
            log.debug("%s closed before its TLS handshake", self.where)
        else:
            log.warning(
                "refused %s: not TLS (first byte 0x%02x); this loader speaks TLS only",
                self.where,
                first[0],
            )
        self.close()

    # -- the loop's -------------------------------------------------------------------------

    async def _open(self) -> None:
        """Give the socket to the loop (and its TLS), the protocol its connection."""
        listener, loop, sock = self._listener, self._loop, self._sock
        if sock is None:
            return
        self._sock = None  # from here the loop closes it, even if this task is cancelled

        def protocol() -> asyncio.BaseProtocol:
            return listener.factory(self)

        transport: asyncio.Transport
        try:
            if listener.context is None:
                transport, _ = await loop.connect_accepted_socket(protocol, sock)
            else:
                left = listener.handshake - (time.monotonic() - self.since)
                secured = await tls_stream.accept(loop, sock, listener.context, max(left, 1e-3))
                transport = tls_stream.TLSStream(
                    loop, secured, cast(asyncio.BufferedProtocol, protocol())
                )
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:  # gone: a port check, say
            log.debug("%s closed during its TLS handshake: %s", self.where, exc)
        except ssl.SSLError as exc:
            log.warning("refused %s: TLS handshake failed (%s)", self.where, tls.why(exc))
        except (ConnectionAbortedError, TimeoutError):  # the TLS handshake's timeout
            log.warning("closed %s: no handshake within %.1fs", self.where, listener.handshake)
        except OSError as exc:
            log.debug("%s closed during its TLS handshake: %s", self.where, exc)
        else:
            self._transport = transport
            if self._closing:
                transport.abort()  # connection_lost follows, as for any other close
            if not transport.is_closing():
                return
        self.gone()
