"""TLS across untrusted networks (SPEC "Wire and trust"): contexts, the loader's TLS stream,
the member's wrapping, and the refusals both ends report.

TLS 1.3 only, certificates checked both ways against one CA, the loader's host name checked
by members. The cookie handshake and the per-frame tags run inside TLS unchanged: TLS keeps
what crosses the network private and refuses peers without a certificate of the CA, the
cookie still proves the peer belongs to this cluster, and a tag failure still ends a
connection whatever carried it.

The loader speaks first in clustorage's own handshake and a TLS client speaks first in
TLS, so a member without TLS meeting a TLS loader would wait in silence: a TLS connection
that has sent nothing for :data:`SILENCE` seconds is sent a TLS alert and closed, which such
a member recognises (:func:`check_reply`). A TLS member meeting a loader without TLS reads
clustorage's hello where a TLS record belongs (:func:`refusal`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from .config import NodeConfig
from .errors import AuthenticationError, ConfigError
from .reactor import READ, WRITE, Reactor, Server, Stream, StreamProtocol, Timer

__all__ = [
    "SILENCE",
    "TLSFiles",
    "TLSStream",
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
BATCH = 64 << 10  # bytes of small frames gathered into one TLS write (of 16 KiB records)
READS_PER_WAKEUP = 64  # TLS records read per readiness, at most, while they stream in
RECORD = 16384  # the payload of a full TLS record: a read this big means more is streaming
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
        context.sslsocket_class = _MemberSocket
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
    return _context(files, server=False)


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


class _MemberSocket(ssl.SSLSocket):
    """A blocking TLS socket whose ``sendall`` is one TLS write: on a blocking socket it
    returns once everything is written (or raises), without ``ssl``'s loop around it."""

    def sendall(self, data: Any, flags: int = 0) -> None:
        sslobj = getattr(self, "_sslobj", None)
        if flags or sslobj is None or self.gettimeout() is not None:
            super().sendall(data, flags)
            return
        sslobj.write(data)


def connect(context: ssl.SSLContext, sock: socket.socket, host: str, where: str) -> ssl.SSLSocket:
    """Wrap a connected blocking socket and do the TLS handshake (within its timeout).

    Raises:
        ConfigError, AuthenticationError: see :func:`refusal`.
    """
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except ssl.SSLError as exc:
        raise refusal(exc, where) from None


def check_reply(data: bytes, where: str) -> None:
    """Refuse, clearly, a loader that answered a member without TLS in TLS.

    Raises:
        ConfigError: ``data`` (the first bytes from the loader) is a TLS record.
    """
    if len(data) >= 2 and data[0] in (0x15, _HANDSHAKE_RECORD) and data[1] == 0x03:
        raise ConfigError(f"the loader at {where} speaks TLS: start this node with {FLAGS}")


# -- the loader's side -----------------------------------------------------------------------


class TLSStream(Stream):
    """A :class:`Stream` over TLS: handshakes on readiness, then reads and writes records.

    The protocol is told of the connection at once (its handshake deadline then covers the
    TLS handshake); what it writes meanwhile waits for TLS to be up.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        reactor: Reactor,
        sock: socket.socket,
        protocol: StreamProtocol,
        server: Server | None = None,
    ) -> None:
        self._handshaking = True
        self._heard = False
        self._batch: list[bytes | memoryview] = []
        self._batched = 0
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        self._silence: Timer | None = reactor.call_later(SILENCE, self._silent)
        super().__init__(reactor, tls, protocol, server)

    def _where(self) -> str:
        peer = self._peer
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    def write(self, data: bytes | memoryview) -> None:
        if self._closing or not data:
            return
        if self._handshaking:
            self._pending.append(memoryview(data))
            self._size += len(data)
            return
        # Small frames written in one turn of the loop (an answer and a hot-load, say) go
        # out as one TLS record at the end of it: each record costs a write and a read.
        size = len(data)
        if size >= BATCH:
            self._flush_batch()
            super().write(data)
            return
        self._batch.append(data)
        self._batched += size
        if self._batched >= BATCH:
            self._flush_batch()
        elif len(self._batch) == 1:
            self._reactor.call_soon(self._flush_batch)

    def _flush_batch(self) -> None:
        batch = self._batch
        if batch:
            data = batch[0] if len(batch) == 1 else b"".join(batch)
            batch.clear()
            self._batched = 0
            super().write(data)

    def get_write_buffer_size(self) -> int:
        return self._size + self._batched

    def close(self) -> None:
        self._flush_batch()
        super().close()

    def abort(self) -> None:
        self._batch.clear()
        self._batched = 0
        super().abort()

    def _ready(self, mask: int) -> None:
        if self._handshaking:
            if self._closing:
                self._lose(None)
            else:
                self._shake()
            return
        if mask & READ and not self._closing:
            self._read()
        if mask & WRITE and not self._closed:
            self._drain()

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
            socket.socket.send(self._sock, _ALERT)
        self.abort()

    def _shake(self) -> None:
        sock: Any = self._sock
        if not self._heard:
            try:
                first = socket.socket.recv(sock, 1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                first = b""
            self._heard = True
            if self._silence is not None:
                self._silence.cancel()
            if not first:  # connected and closed: a port check, say
                log.debug("%s closed before its TLS handshake", self._where())
                self.abort()
                return
            if first[0] != _HANDSHAKE_RECORD:
                log.warning(
                    "refused %s: not TLS (first byte 0x%02x); this loader speaks TLS only",
                    self._where(),
                    first[0],
                )
                self.abort()
                return
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._reactor.modify(sock, READ, self._ready)
            return
        except ssl.SSLWantWriteError:
            self._reactor.modify(sock, READ | WRITE, self._ready)
            return
        except (ssl.SSLError, OSError) as exc:
            log.warning("refused %s: TLS handshake failed (%s)", self._where(), _why(exc))
            self.abort()
            return
        self._handshaking = False
        self._reactor.modify(sock, READ | WRITE if self._pending else READ, self._ready)
        if self._pending:
            self._drain()
        if not self._closing:
            self._read()  # records that came with the handshake's last flight

    def _read(self) -> None:
        sock: Any = self._sock
        protocol = self._protocol
        for _ in range(READS_PER_WAKEUP):
            try:
                size = sock.recv_into(protocol.get_buffer(-1))
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return
            except ssl.SSLError as exc:
                log.warning(
                    "closed %s: a TLS record failed its check (%s): altered on the way",
                    self._where(),
                    _why(exc),
                )
                self._lose(exc)
                return
            except OSError as exc:
                self._lose(exc)
                return
            except Exception:
                log.exception("closed a connection: handling what it sent failed")
                self.abort()
                return
            if not size:
                break
            try:
                protocol.buffer_updated(size)
            except Exception:
                log.exception("closed a connection: handling what it sent failed")
                self.abort()
                return
            if self._closing:
                return
            if size < RECORD and not sock.pending():
                return  # a request: the poller reports what follows, without a failing read
        else:
            if sock.pending():  # decrypted bytes the poller cannot see: read them next turn
                self._reactor.call_soon(self._read_more)
            return
        try:
            protocol.eof_received()
        except Exception:
            log.exception("a connection's end of file was not handled cleanly")
        finally:
            self.close()

    def _read_more(self) -> None:
        if not self._closing:
            self._read()


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
