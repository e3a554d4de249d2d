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
RAW = 1 << 20  # bytes a member's TLS socket reads at once
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


class TLSSocket(socket.socket):
    """A member's blocking socket with TLS done in memory (``ssl.SSLObject`` over two
    ``MemoryBIO``): one ``recv`` takes every record that has come, where TLS on the socket
    reads each in two, and ``sendall`` sends a message's records at once. It reads and
    writes as a plain socket does (MSG_DONTWAIT and the receive timeout included), so the
    member's code is the same over TLS.

    TLS state is touched under a lock held only while bytes are encrypted or decrypted,
    never while waiting on the network: a member reads on one thread while others send.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, host: str) -> None:
        timeout = sock.gettimeout()
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.settimeout(timeout)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=host)
        self._raw = memoryview(bytearray(RAW))
        self._lock = threading.Lock()  # the TLS object
        self._sending = threading.Lock()  # the order of records on the wire
        self._more = False  # the last read filled its buffer: TLS may hold more
        self._ended = False

    def handshake(self) -> None:
        """Do the TLS handshake, within the socket's timeout.

        Raises:
            ssl.SSLError: TLS failed; OSError: the connection did.
        """
        while True:
            try:
                with self._lock:
                    self._tls.do_handshake()
            except ssl.SSLWantReadError:
                wanting = True
            else:
                wanting = False
            self._flush()
            if not wanting:
                return
            if not self._fill():
                raise ConnectionResetError("the loader closed the connection in TLS's handshake")

    def _fill(self) -> bool:
        """Read what the socket has into TLS (blocking as the socket does); False at its end."""
        size = super().recv_into(self._raw)
        if size:
            with self._lock:
                self._incoming.write(self._raw[:size])
        return bool(size)

    def _flush(self) -> None:
        with self._sending:
            with self._lock:
                data = self._outgoing.read()
            if data:
                super().sendall(data)

    def pending(self) -> bool:
        """Whether TLS may hold records that the socket will not report: the last read
        stopped because the buffer was full."""
        return self._more

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Decrypt into ``buffer`` every whole record there is, reading the socket (with
        ``flags``: MSG_DONTWAIT works as on any socket) only when there is none."""
        view = memoryview(buffer).cast("B")
        size = nbytes or len(view)
        while True:
            got = self._decrypt(view, size)
            if got or self._ended:
                return got
            received = super().recv_into(self._raw, 0, flags)
            if not received:
                return 0
            with self._lock:
                self._incoming.write(self._raw[:received])

    def _decrypt(self, view: memoryview, size: int) -> int:
        total = 0
        tls, incoming = self._tls, self._incoming
        with self._lock:
            while total < size:
                if not incoming.pending and not tls.pending():
                    self._more = False  # read no further: a failing read costs more
                    break
                try:
                    got = int(self._tls.read(size - total, view[total:]))
                except ssl.SSLWantReadError:
                    self._more = False
                    break
                except ssl.SSLZeroReturnError:
                    got = 0
                if not got:
                    self._ended = True
                    break
                total += got
            else:
                self._more = True
            answer = self._outgoing.pending  # TLS's own messages, if any
        if answer:
            self._flush()
        return total

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        buffer = bytearray(bufsize)
        return bytes(buffer[: self.recv_into(buffer, bufsize, flags)])

    def sendall(self, data: Any, flags: int = 0) -> None:
        with self._sending:
            with self._lock:
                self._tls.write(data)
                records = self._outgoing.read()
            super().sendall(records)


def connect(context: ssl.SSLContext, sock: socket.socket, host: str, where: str) -> TLSSocket:
    """Take over a connected blocking socket and do the TLS handshake (within its timeout).

    Raises:
        ConfigError, AuthenticationError: see :func:`refusal`.
    """
    tls = TLSSocket(sock, context, host)
    try:
        tls.handshake()
    except ssl.SSLError as exc:
        tls.close()
        raise refusal(exc, where) from None
    except BaseException:
        tls.close()
        raise
    return tls


def check_reply(data: bytes, where: str) -> None:
    """Refuse, clearly, a loader that answered a member without TLS in TLS.

    Raises:
        ConfigError: ``data`` (the first bytes from the loader) is a TLS record.
    """
    if len(data) >= 2 and data[0] in (0x15, _HANDSHAKE_RECORD) and data[1] == 0x03:
        raise ConfigError(f"the loader at {where} speaks TLS: start this node with {FLAGS}")


# -- the loader's side -----------------------------------------------------------------------


# Every TLS stream reads the socket into this one buffer: the loop runs one callback at a
# time, and the bytes go into the stream's TLS object before the next read.
_RAW = memoryview(bytearray(1 << 20))


class TLSStream(Stream):
    """A :class:`Stream` over TLS, TLS done in memory (``ssl.SSLObject`` over two
    ``MemoryBIO``): one ``recv`` takes every record that has come and one ``send`` takes
    what a turn of the loop wrote, as on a plaintext stream, where TLS on the socket would
    make two reads of every record.

    The protocol is told of the connection at once (its handshake deadline then covers the
    TLS handshake); what it writes meanwhile waits for TLS to be up. Small frames written in
    one turn of the loop (an answer and a hot-load, say) go out as one TLS write at the end
    of it.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        reactor: Reactor,
        sock: socket.socket,
        protocol: StreamProtocol,
        server: Server | None = None,
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._handshaking = True
        self._heard = False
        self._early: list[bytes | memoryview] = []  # written before TLS was up
        self._batch: list[bytes | memoryview] = []
        self._batched = 0
        self._silence: Timer | None = reactor.call_later(SILENCE, self._silent)
        super().__init__(reactor, sock, protocol, server)

    def _where(self) -> str:
        peer = self._peer
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    # -- writing ---------------------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        if self._closing or not data:
            return
        if self._handshaking:
            self._early.append(data)
            self._batched += len(data)
            return
        size = len(data)
        if size >= BATCH:
            self._flush_batch()
            self._send_records(data)
            return
        self._batch.append(data)
        self._batched += size
        if self._batched >= BATCH:
            self._flush_batch()
        elif len(self._batch) == 1:
            self._reactor.call_soon(self._flush_batch)

    def _flush_batch(self) -> None:
        batch = self._batch
        if batch and not self._handshaking:
            data = batch[0] if len(batch) == 1 else b"".join(batch)
            batch.clear()
            self._batched = 0
            self._send_records(data)

    def _send_records(self, data: bytes | memoryview) -> None:
        if self._closing:
            return
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:
            log.warning("closed %s: TLS cannot send (%s)", self._where(), _why(exc))
            self.abort()
            return
        self._send_pending()

    def _send_pending(self) -> None:
        if self._outgoing.pending:
            super().write(self._outgoing.read())

    def get_write_buffer_size(self) -> int:
        return self._size + self._batched

    def close(self) -> None:
        self._flush_batch()
        super().close()

    def abort(self) -> None:
        self._batch.clear()
        self._early.clear()
        self._batched = 0
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
        """Whether the peer starts a TLS handshake (else it is closed, with a log line)."""
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
            return True
        self.abort()
        return False

    def _read(self) -> None:
        if not self._heard and not self._first_byte():
            return
        try:
            size = self._sock.recv_into(_RAW)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lose(exc)
            return
        if not size:
            self._end()
            return
        self._incoming.write(_RAW[:size])
        if self._handshaking and not self._shake():
            return
        self._records()

    def _shake(self) -> bool:
        """Go on with the TLS handshake; whether it is done (and the stream open)."""
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._send_pending()
            return False
        except (ssl.SSLError, OSError) as exc:
            self._send_pending()  # the alert that tells the peer why
            log.warning("refused %s: TLS handshake failed (%s)", self._where(), _why(exc))
            self.close()
            return False
        self._handshaking = False
        early, self._early = self._early, []
        self._batched = 0
        self._send_pending()
        for data in early:
            self.write(data)
        return True

    def _records(self) -> None:
        """Hand the protocol every record that has come in whole, as many at a time as its
        buffer takes (a big payload then arrives in big pieces, as without TLS)."""
        tls, protocol, incoming = self._tls, self._protocol, self._incoming
        while not self._closing:
            if not incoming.pending and not tls.pending():
                return  # read no further: a read that fails costs more than this check
            try:
                buffer = protocol.get_buffer(-1)
                filled, room = 0, len(buffer)
                while filled < room and (incoming.pending or tls.pending()):
                    size = cast(int, tls.read(room - filled, buffer[filled:]))
                    if not size:
                        break
                    filled += size
            except ssl.SSLWantReadError:
                if filled:
                    self._hand(filled)
                return
            except ssl.SSLZeroReturnError:
                self._end()
                return
            except ssl.SSLError as exc:
                log.warning(
                    "closed %s: a TLS record failed its check (%s): altered on the way",
                    self._where(),
                    _why(exc),
                )
                self._lose(exc)
                return
            except Exception:
                log.exception("closed a connection: handling what it sent failed")
                self.abort()
                return
            if not filled:
                self._end()
                return
            self._hand(filled)

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
