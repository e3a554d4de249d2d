"""TLS across untrusted networks (SPEC "Wire and trust"): contexts, the loader's TLS stream,
the member's wrapping, and the refusals both ends report.

TLS 1.3 only, certificates checked both ways against one CA, the loader's host name checked
by members. TLS keeps what crosses the network private and refuses peers without a
certificate of the CA; the cookie handshake runs inside it, bound to the TLS session
(:func:`channel_binding`), so the cookie is proven on this connection and no other, and
frames go without tags of their own (see ``protocol``'s docstring).

Both ends let OpenSSL read and write the socket itself: a record goes from the socket to
the protocol's buffer (or back) in one call, with no Python in between.

The loader speaks first in clustorage's own handshake and a TLS client speaks first in
TLS, so a member without TLS meeting a TLS loader would wait in silence: a TLS connection
that has sent nothing for :data:`SILENCE` seconds is sent a TLS alert and closed, which such
a member recognises (:func:`check_reply`). A TLS member meeting a loader without TLS reads
clustorage's hello where a TLS record belongs (:func:`refusal`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import ssl
import struct
import threading
from dataclasses import dataclass
from typing import Any, cast

from .config import NodeConfig
from .errors import AuthenticationError, ConfigError
from .reactor import Reactor, Server, Stream, StreamProtocol, Timer

__all__ = [
    "SILENCE",
    "TLSFiles",
    "TLSSocket",
    "TLSStream",
    "channel_binding",
    "check_reply",
    "client_context",
    "connect",
    "listen_tls",
    "node_files",
    "refusal",
    "server_context",
]

log = logging.getLogger(__name__)

SILENCE = 1.0  # seconds a TLS client may take to start its handshake: it starts at once
RECORD = 16384  # the payload of a full TLS record: a read this big means more is coming
_HANDSHAKE_RECORD = 0x16
_ALERT = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x46])  # fatal protocol_version
_NOT_TLS = {"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"}
FLAGS = "--tls-cert/--tls-key/--tls-ca"


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """The PEM files of a node: its certificate, its private key and the cluster's CA."""

    cert: str
    key: str
    ca: str


def node_files(config: NodeConfig) -> TLSFiles | None:
    """The TLS files a node was configured with, or None for a node without TLS."""
    if not config.tls_cert:
        return None
    return TLSFiles(config.tls_cert, config.tls_key, config.tls_ca)


def _context(files: TLSFiles, server: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    if server:
        context.num_tickets = 0  # no resumption: a ticket arriving later would cost a read
    else:
        context.check_hostname = True
    try:
        context.load_verify_locations(cafile=files.ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot use the CA certificate {files.ca} (--tls-ca): {_why(exc)}; give the "
            f"cluster's ca.pem (made by 'clustorage tls init')"
        ) from None
    try:
        context.load_cert_chain(files.cert, files.key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"the key {files.key} (--tls-key) does not match the certificate {files.cert} "
                f"(--tls-cert); give the key that was made with that certificate"
            ) from None
        raise ConfigError(
            f"cannot use the certificate {files.cert} with the key {files.key} "
            f"(--tls-cert, --tls-key): {_why(exc)}"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read {exc.filename or files.cert + ' or ' + files.key} "
            f"(--tls-cert, --tls-key): {exc.strerror}"
        ) from None
    return context


def server_context(files: TLSFiles) -> ssl.SSLContext:
    """The loader's context: TLS 1.3, members must show a certificate of the CA.

    Raises:
        ConfigError: naming the file that cannot be used (or the key and certificate that do
            not match).
    """
    return _context(files, server=True)


def client_context(files: TLSFiles) -> ssl.SSLContext:
    """A member's (or probe's) context: TLS 1.3, the loader's certificate and host checked."""
    return _client_context(_context(files, server=False))


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return str(exc.verify_message)
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


# -- a member's side -------------------------------------------------------------------------


def refusal(exc: ssl.SSLError, where: str) -> Exception:
    """The error a member raises when TLS with the loader at ``where`` fails."""
    if exc.reason in _NOT_TLS:
        return ConfigError(
            f"the loader at {where} does not speak TLS: start this node without {FLAGS}, "
            f"or the loader with them"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return AuthenticationError(
            f"the loader at {where} showed a certificate this node does not accept "
            f"({exc.verify_message}); give both the same CA (--tls-ca), a certificate "
            f"that names the loader's host and has not expired"
        )
    return AuthenticationError(
        f"the loader at {where} refused this node's TLS certificate ({_why(exc)}); give this "
        f"node a certificate of the loader's CA that has not expired ({FLAGS})"
    )


def _tls_object(sock: socket.socket) -> Any:
    """An ``ssl.SSLSocket``'s own TLS object (``_ssl._SSLSocket``, None once closed): its
    ``read``, ``write`` and ``pending`` are the socket's without the Python checks that
    ``ssl.py`` wraps around every call, which cost more than a small record's cipher."""
    return getattr(sock, "_sslobj", None)


class TLSSocket(ssl.SSLSocket):
    """A member's TLS socket (a client context's ``sslsocket_class``): OpenSSL reads and
    writes the socket itself, and it reads and writes as a plain blocking socket does
    (``MSG_DONTWAIT``, the receive timeout and ``settimeout`` included), so the member's
    code is the same over TLS.

    A member reads on one thread while others send, and one TLS connection must not be
    used by two threads at once: after the handshake the socket is non-blocking, every
    call into TLS is made under a lock, and waiting for the network (``poll``) happens
    outside it.
    """

    _lock: threading.Lock
    _readable: select.poll
    _writable: select.poll
    _open = False  # the handshake is done: waiting is emulated from here on
    _wait: float | None = None  # settimeout's value once open

    def open(self) -> None:
        """After the handshake: make the socket non-blocking and wait with ``poll``."""
        self._lock = threading.Lock()
        self._wait = self.gettimeout()
        self._readable, self._writable = select.poll(), select.poll()
        self._readable.register(self.fileno(), select.POLLIN)
        self._writable.register(self.fileno(), select.POLLOUT)
        socket.socket.settimeout(self, 0.0)
        self._open = True

    def settimeout(self, value: float | None) -> None:
        if self._open:
            self._wait = value
        else:
            super().settimeout(value)

    def gettimeout(self) -> float | None:
        return self._wait if self._open else super().gettimeout()

    def _ready_for(self, events: int, poll: bool = False) -> bool:
        """Whether the socket is ready for ``events``; unless ``poll``, wait until it is:
        within settimeout's value, or else within the receive timeout (SO_RCVTIMEO) for
        reads and for ever for writes.

        Raises:
            TimeoutError: it was not, in time.
        """
        poller = self._readable if events == select.POLLIN else self._writable
        if poll:
            return bool(poller.poll(0))
        wait = self._wait
        if wait is None and events == select.POLLIN:
            seconds, micros = struct.unpack(
                "ll", self.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)
            )
            wait = seconds + micros / 1e6 or None
        if not poller.poll(None if wait is None else wait * 1000):
            raise TimeoutError("timed out")
        return True

    def _tls(self) -> Any:
        tls = _tls_object(self)
        if tls is None:
            raise OSError(errno.EBADF, "the TLS connection is closed")
        return tls

    def pending(self) -> int:
        """How many bytes TLS holds that no poll of the socket would report."""
        tls = _tls_object(self)
        return 0 if tls is None else int(tls.pending())

    def recv_into(self, buffer: Any, nbytes: int | None = 0, flags: int = 0) -> int:
        """Decrypt into ``buffer`` what has come, up to ``nbytes``; 0 at the end."""
        if not self._open:
            return super().recv_into(buffer, nbytes or None, flags)
        view = memoryview(buffer)
        size = nbytes or len(view)
        tls = self._tls()
        while True:
            if not tls.pending() and not self._ready_for(select.POLLIN, poll=True):
                if flags & socket.MSG_DONTWAIT:
                    raise BlockingIOError(errno.EAGAIN, "no TLS record has come")
                self._ready_for(select.POLLIN)
            total = 0
            with self._lock:
                try:
                    while True:
                        got = int(tls.read(size - total, view[total:] if total else view))
                        if not got:
                            return total
                        total += got
                        if total >= size or (got < RECORD and not tls.pending()):
                            return total
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    if total:
                        return total
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return total

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        buffer = bytearray(buflen)
        return bytes(buffer[: self.recv_into(buffer, buflen, flags)])

    def sendall(self, data: Any, flags: int = 0) -> None:
        if not self._open:
            super().sendall(data, flags)
            return
        view = memoryview(data)
        tls = self._tls()
        while True:
            with self._lock:
                try:
                    tls.write(view)  # whole, or SSLWantWriteError: then again, the same
                    return
                except ssl.SSLWantWriteError:
                    pass
            self._ready_for(select.POLLOUT)

    def shutdown(self, how: int) -> None:
        """Shut the socket down (waking a reader) and leave TLS to close()."""
        socket.socket.shutdown(self, how)


def _client_context(context: ssl.SSLContext) -> ssl.SSLContext:
    context.sslsocket_class = TLSSocket
    return context


def connect(context: ssl.SSLContext, sock: socket.socket, host: str, where: str) -> TLSSocket:
    """Take over a connected blocking socket and do the TLS handshake (within its timeout).

    Raises:
        ConfigError, AuthenticationError: see :func:`refusal`.
    """
    try:
        tls = cast(TLSSocket, context.wrap_socket(sock, server_hostname=host))  # handshakes
    except ssl.SSLError as exc:
        sock.close()
        raise refusal(exc, where) from None
    except BaseException:
        sock.close()
        raise
    tls.open()
    return tls


def channel_binding(sock: socket.socket) -> bytes:
    """What the cookie handshake is bound to over TLS: ``tls-unique``, the first Finished
    message of the TLS handshake, the same at both ends and unique to this TLS session
    (sessions are never resumed here: the loader issues no tickets). b"" without TLS."""
    if not isinstance(sock, ssl.SSLSocket):
        return b""
    return sock.get_channel_binding("tls-unique") or b""


def check_reply(data: bytes, where: str) -> None:
    """Refuse, clearly, a loader that answered a member without TLS in TLS.

    Raises:
        ConfigError: ``data`` (the first bytes from the loader) is a TLS record.
    """
    if len(data) >= 2 and data[0] in (0x15, _HANDSHAKE_RECORD) and data[1] == 0x03:
        raise ConfigError(f"the loader at {where} speaks TLS: start this node with {FLAGS}")


# -- the loader's side -----------------------------------------------------------------------


class TLSStream(Stream):
    """A :class:`Stream` over TLS on the socket itself (a non-blocking ``ssl.SSLSocket``):
    records are encrypted and decrypted by OpenSSL straight between the socket and the
    protocol's buffer, with no Python in between, so an answer costs about what it costs
    in plaintext plus the cipher.

    The protocol is told of the connection at once (its handshake deadline then covers the
    TLS handshake); what it writes meanwhile waits for TLS to be up.
    """

    _WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError)

    def __init__(
        self,
        context: ssl.SSLContext,
        reactor: Reactor,
        sock: socket.socket,
        protocol: StreamProtocol,
        server: Server | None = None,
    ) -> None:
        self._context = context
        self._handshaking = True
        self._heard = False
        self._early: list[bytes | memoryview] = []  # written before TLS was up
        self._early_size = 0
        self._silence: Timer | None = reactor.call_later(SILENCE, self._silent)
        super().__init__(reactor, sock, protocol, server)

    def _where(self) -> str:
        peer = self._peer
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    def get_extra_info(self, name: str) -> Any:
        """``channel_binding``: the TLS session's (see :func:`channel_binding`), once up."""
        if name == "channel_binding":
            return None if self._handshaking else channel_binding(self._sock)
        return super().get_extra_info(name)

    # -- writing ---------------------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        if self._handshaking:
            if not self._closing and data:
                self._early.append(data)
                self._early_size += len(data)
            return
        super().write(data)

    def get_write_buffer_size(self) -> int:
        return self._size + self._early_size

    def abort(self) -> None:
        self._early.clear()
        self._early_size = 0
        super().abort()

    # -- reading ---------------------------------------------------------------------------

    def _silent(self) -> None:
        self._silence = None
        if self._heard or self._closing:
            return
        log.warning(
            "refused %s: it sent nothing, as a member without TLS would; this loader "
            "speaks TLS only (start members with %s)",
            self._where(),
            FLAGS,
        )
        with contextlib.suppress(OSError):
            self._sock.send(_ALERT)
        self.abort()

    def _first_byte(self) -> bool:
        """Whether the peer starts a TLS handshake (then the socket is wrapped in TLS); else
        it is closed, with a log line."""
        try:
            first = self._sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            first = b""
        self._heard = True
        if self._silence is not None:
            self._silence.cancel()
        if not first:  # connected and closed: a port check, say
            log.debug("%s closed before its TLS handshake", self._where())
        elif first[0] != _HANDSHAKE_RECORD:
            log.warning(
                "refused %s: not TLS (first byte 0x%02x); this loader speaks TLS only",
                self._where(),
                first[0],
            )
        else:
            self._sock = self._context.wrap_socket(
                self._sock, server_side=True, do_handshake_on_connect=False
            )
            return True
        self.abort()
        return False

    def _read(self) -> None:
        if not self._heard and not self._first_byte():
            return
        if self._handshaking and not self._shake():
            return
        tls, protocol = _tls_object(self._sock), self._protocol
        filled = 0
        try:
            while not self._closing:  # fill the protocol's buffer, then hand it over
                buffer = protocol.get_buffer(-1)
                filled, room = 0, len(buffer)
                while filled < room:
                    size = tls.read(room - filled, buffer[filled:] if filled else buffer)
                    if not size:
                        break
                    filled += size
                    if size < RECORD and not tls.pending():
                        break  # epoll tells of what the kernel holds; TLS holds no more
                if not filled:
                    self._end()
                    return
                protocol.buffer_updated(filled)
                if filled < room:
                    return
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
            if filled:
                self._hand(filled)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            self._end()
        except ssl.SSLError as exc:
            log.warning(
                "closed %s: a TLS record failed its check (%s): altered on the way",
                self._where(),
                _why(exc),
            )
            self._lose(exc)
        except OSError as exc:
            self._lose(exc)
        except Exception:
            log.exception("closed a connection: handling what it sent failed")
            self.abort()

    def _shake(self) -> bool:
        """Go on with the TLS handshake; whether it is done (and the stream open)."""
        sock = cast(ssl.SSLSocket, self._sock)
        try:
            sock.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except (ssl.SSLError, OSError) as exc:
            log.warning("refused %s: TLS handshake failed (%s)", self._where(), _why(exc))
            self.abort()
            return False
        self._handshaking = False
        self._send = _tls_object(sock).write  # ssl.SSLSocket.send without its checks
        early, self._early = self._early, []
        self._early_size = 0
        for data in early:
            self.write(data)
        return True

    def _hand(self, size: int) -> None:
        try:
            self._protocol.buffer_updated(size)
        except Exception:
            log.exception("closed a connection: handling what it sent failed")
            self.abort()

    def _end(self) -> None:
        try:
            self._protocol.eof_received()
        except Exception:
            log.exception("a connection's end of file was not handled cleanly")
        finally:
            self.close()


def listen_tls(
    reactor: Reactor,
    context: ssl.SSLContext,
    host: str,
    port: int,
    protocol_factory: Any,
) -> Server:
    """:meth:`Reactor.listen`, each connection a :class:`TLSStream` under ``context``."""

    def stream(
        reactor: Reactor, sock: socket.socket, protocol: StreamProtocol, server: Server
    ) -> Stream:
        return TLSStream(context, reactor, sock, protocol, server)

    return reactor.listen(host, port, protocol_factory, stream=stream)
