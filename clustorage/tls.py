"""TLS across untrusted networks (SPEC "Wire and trust"): contexts, the member's wrapping,
and the refusals both ends report.

TLS 1.3 only, certificates checked both ways against one CA, the loader's host name checked
by members. TLS keeps what crosses the network private and refuses peers without a
certificate of the CA; the cookie handshake runs inside it, bound to the TLS session
(:func:`channel_binding`), so the cookie is proven on this connection and no other, and
frames go without tags of their own (see ``protocol``'s docstring).

A member lets OpenSSL read and write the socket itself: a record goes from the socket to
its buffer (or back) in one call, with no Python in between; so does the loader
(:mod:`~.tls_stream`).

The loader speaks first in clustorage's own handshake and a TLS client speaks first in
TLS, so a member without TLS meeting a TLS loader would wait in silence: a TLS connection
that has sent nothing for :data:`SILENCE` seconds is sent a TLS alert (:data:`ALERT`) and
closed, which such a member recognises (:func:`check_reply`). A TLS member meeting a loader
without TLS reads clustorage's hello where a TLS record belongs (:func:`refusal`).
"""

from __future__ import annotations

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

__all__ = [
    "ALERT",
    "FLAGS",
    "HANDSHAKE_RECORD",
    "SILENCE",
    "TLSFiles",
    "TLSSocket",
    "channel_binding",
    "check_reply",
    "client_context",
    "connect",
    "node_files",
    "read_records",
    "refusal",
    "server_context",
    "tls_object",
    "why",
]

log = logging.getLogger(__name__)

SILENCE = 1.0  # seconds a TLS client may take to start its handshake: it starts at once
RECORD = 16384  # the payload of a full TLS record: a read this big means more is coming
HANDSHAKE_RECORD = 0x16
ALERT = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x46])  # fatal protocol_version
_NOT_TLS = {"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"}
FLAGS = "--tls-cert/--tls-key/--tls-ca"
DONTWAIT = int(socket.MSG_DONTWAIT)  # an int: the enum's "&" is a Python call


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
            f"cannot use the CA certificate {files.ca} (--tls-ca): {why(exc)}; give the "
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
            f"(--tls-cert, --tls-key): {why(exc)}"
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


def why(exc: BaseException) -> str:
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
        f"the loader at {where} refused this node's TLS certificate ({why(exc)}); give this "
        f"node a certificate of the loader's CA that has not expired ({FLAGS})"
    )


def tls_object(sock: socket.socket) -> Any:
    """An ``ssl.SSLSocket``'s own TLS object (``_ssl._SSLSocket``, None once closed): its
    ``read``, ``write`` and ``pending`` are the socket's without the Python checks that
    ``ssl.py`` wraps around every call, which cost more than a small record's cipher."""
    return getattr(sock, "_sslobj", None)


FULL, WAITING, ENDED = "full", "waiting", "ended"  # why read_records stopped


def read_records(
    tls: Any, view: memoryview, filled: int, size: int
) -> tuple[int, str, Exception | None]:
    """Read TLS records with ``tls`` (a :func:`tls_object`) into ``view``, from ``filled``
    up to ``size`` bytes, as long as whole records keep coming: the bytes ``view`` now
    holds; why it stopped (FULL: ``size`` reached; WAITING: a short record with nothing
    behind it in TLS, or TLS waits for the socket; ENDED: the end of input); and the error
    that stopped it, if one did (the bytes before it are in ``view``)."""
    try:
        while filled < size:
            got = int(tls.read(size - filled, view[filled:] if filled else view))
            if not got:
                return filled, ENDED, None
            filled += got
            if got < RECORD and not tls.pending():
                return filled, WAITING, None
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return filled, WAITING, None
    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
        return filled, ENDED, None
    except (ssl.SSLError, OSError) as exc:
        return filled, WAITING, exc
    return filled, FULL, None


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

    def _ready_for(self, events: int) -> None:
        """Wait until the socket is ready for ``events``: within settimeout's value, or else
        within the receive timeout (SO_RCVTIMEO) for reads and for ever for writes.

        Raises:
            TimeoutError: it was not, in time.
        """
        poller = self._readable if events == select.POLLIN else self._writable
        wait = self._wait
        if wait is None and events == select.POLLIN:
            seconds, micros = struct.unpack(
                "ll", self.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)
            )
            wait = seconds + micros / 1e6 or None
        if not poller.poll(None if wait is None else wait * 1000):
            raise TimeoutError("timed out")

    def _tls(self) -> Any:
        """(The lock held.) The TLS object, as long as the socket is open: once closed, its
        number may already be another connection's."""
        tls = tls_object(self)
        if tls is None:
            raise OSError(errno.EBADF, "the TLS connection is closed")
        return tls

    def pending(self) -> int:
        """How many bytes TLS holds that no poll of the socket would report. Without the
        lock: it reads the receiving side's state only, which nobody but the reader
        (holding the lock) changes, and the object outlives a close while referenced."""
        tls = tls_object(self)
        return 0 if tls is None else int(tls.pending())

    def _real_close(self) -> None:
        if not self._open:
            super()._real_close()  # type: ignore[misc]
            return
        with self._lock:  # no thread is inside TLS, and none gets in after
            super()._real_close()  # type: ignore[misc]

    def recv_into(self, buffer: Any, nbytes: int | None = 0, flags: int = 0) -> int:
        """Decrypt into ``buffer`` what has come, up to ``nbytes``; 0 at the end.

        With ``MSG_DONTWAIT`` (a caller polling for its answer) the socket is polled first:
        TLS reports an empty socket with an exception, which costs more than the poll. A
        blocking call reads first, and polls only for a record that has not come. A small
        answer is one read; what fills the buffer (a big payload arriving) goes on."""
        if not self._open:
            return super().recv_into(buffer, nbytes or None, flags)
        size = nbytes or len(buffer)
        dontwait = flags & DONTWAIT
        while True:
            if dontwait and not self._readable.poll(0) and not self.pending():
                raise BlockingIOError(errno.EAGAIN, "no TLS record has come")
            with self._lock:
                tls = self._tls()
                try:
                    got = int(tls.read(size, buffer))
                    if (got < RECORD and not tls.pending()) or got >= size or not got:
                        return got
                    total, _, error = read_records(tls, memoryview(buffer), got, size)
                    if error is not None:
                        raise error
                    return total
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return 0
            if dontwait:
                raise BlockingIOError(errno.EAGAIN, "no TLS record has come")
            self._ready_for(select.POLLIN)

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        buffer = bytearray(buflen)
        return bytes(buffer[: self.recv_into(buffer, buflen, flags)])

    def sendall(self, data: Any, flags: int = 0) -> None:
        if not self._open:
            super().sendall(data, flags)
            return
        while True:
            with self._lock:
                try:
                    self._tls().write(data)  # whole, or SSLWantWriteError: then again, the same
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


def channel_binding(tls: object) -> bytes:
    """What the cookie handshake is bound to over TLS: ``tls-unique``, the first Finished
    message of the TLS handshake, the same at both ends and unique to this TLS session
    (sessions are never resumed here: the loader issues no tickets). ``tls``: a member's
    socket, or a loader's transport's ``ssl_object``; b"" without TLS."""
    if not isinstance(tls, ssl.SSLSocket | ssl.SSLObject):
        return b""
    return tls.get_channel_binding("tls-unique") or b""


def check_reply(data: bytes, where: str) -> None:
    """Refuse, clearly, a loader that answered a member without TLS in TLS.

    Raises:
        ConfigError: ``data`` (the first bytes from the loader) is a TLS record.
    """
    if len(data) >= 2 and data[0] in (0x15, HANDSHAKE_RECORD) and data[1] == 0x03:
        raise ConfigError(f"the loader at {where} speaks TLS: start this node with {FLAGS}")
