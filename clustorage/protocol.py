"""The wire protocol as a pure object: bytes in, events out; calls in, bytes out.

Theory of operation
-------------------
Rule 1: nothing a peer sends is decoded before it has proved that it knows the cookie.
Rule 2: after the handshake every frame is authenticated, numbered and bounded in size.

The handshake is a mutual challenge-response in a fixed order (the loader is the server)::

    server -> client   CHALLENGE  magic, version, server nonce
    client -> server   RESPONSE   magic, version, client nonce, client MAC, client meta
    server -> client   WELCOME    server MAC, server meta        (or REJECT: wrong cookie)

The client MAC is HMAC-SHA256(cookie, "clustorage/client" | snonce | cnonce | meta) and the
server MAC is HMAC-SHA256(cookie, "clustorage/server" | snonce | cnonce | client MAC | meta):
each side proves the cookie over nonces the other chose, and the cookie never crosses the wire.
Meta (small JSON: names and versions) is parsed only after its MAC has been checked.

Inside TLS (SPEC "Wire and trust"), both MACs and the session also cover the TLS session's
channel binding (``tls-unique``: the first Finished message, which hashes the whole TLS
handshake), so the cookie handshake proves the cookie *on this TLS connection*: a relay
between two TLS connections, even one holding a certificate of the cluster's CA, fails it.
TLS then authenticates, orders and numbers every record with keys only the two ends have,
so frames carry no tag of their own (``tagged`` is False) and big blobs are not hashed: a
byte flipped on the way fails TLS's record check and ends the connection before any of it
is read.

Both sides then derive one key per direction from the cookie and both nonces. A frame is::

    length (u32) | sequence (u64) | blob length (u32) | payload | tag (32 bytes)

where the tag is keyed BLAKE2b over the header and the payload. The last ``blob length`` bytes
of a payload may be a bulk blob (a big value): the tag then covers the header, the rest of the
payload and the blob's digest (BLAKE3, BLAKE2b or SHA-256: the fastest on the server's CPU
of those the client offered in its meta) instead of the blob itself. The tag comes last so
that both ends hash a big blob while it streams (each on a thread of its own, beside the
one sending or receiving it), and the loader can forward a blob it has verified without
hashing it again. The length is checked against the limit as soon as the header is in; a wrong
sequence number (replay, reorder, drop) or tag (forgery, corruption) is the peer's fault and
ends the connection. An empty payload is a heartbeat.

Every state change is in ``_TRANSITIONS``; anything else raises, naming role and state.

This module holds the handshake, the framing and the state machine, and does no I/O. What
moving a big blob fast takes (the bulk digests, the buffer a bulk frame arrives into, the
thread that hashes it, the digests of verified blobs) is in ``bulk``.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import hmac
import json
import secrets
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .bulk import (
    BASELINE_DIGEST,
    BULK_DIGESTS,
    VERIFIED,
    ArrivingFrame,
    Spiller,
    abandon_hashing,
    sending_hasher,
)
from .errors import (
    AuthenticationError,
    FrameTooLarge,
    LocalProtocolError,
    RemoteProtocolError,
)
from .messages import Blob, Gathered, Payload

__all__ = [
    "BASELINE_DIGEST",
    "BULK",
    "BULK_DIGESTS",
    "CHUNK",
    "HEADER",
    "MAGIC",
    "TAG_SIZE",
    "VERSION",
    "Closed",
    "Connection",
    "Event",
    "Frame",
    "Hello",
    "Role",
    "State",
    "Welcome",
    "frame_size",
]

MAGIC = b"CLST"
VERSION = 3
NONCE_SIZE = 32
MAC_SIZE = 32
TAG_SIZE = 32
META_LIMIT = 4096
HEADER = struct.Struct("!IQI")
_HELLO = struct.Struct(f"!4sH{NONCE_SIZE}s")
_RESPONSE = struct.Struct(f"!4sH{NONCE_SIZE}s{MAC_SIZE}sH")
_WELCOME = struct.Struct(f"!c{MAC_SIZE}sH")
_REJECT = struct.Struct("!cH")
_HEAD = HEADER.size
_unpack_header = HEADER.unpack_from
_compare_digest = hmac.compare_digest
_FORGED = "a frame failed authentication (forged or corrupted)"


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    AWAIT_CHALLENGE = "awaiting the challenge"
    AWAIT_RESPONSE = "awaiting the response"
    AWAIT_DECISION = "deciding whether to accept"
    AWAIT_WELCOME = "awaiting the welcome"
    OPEN = "open"
    CLOSED = "closed"
    ERROR = "in error"


@dataclass(frozen=True, slots=True)
class Hello:
    """The server learned who the (authenticated) client is; call accept() or refuse()."""

    meta: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Welcome:
    """The client learned who the (authenticated) server is; meta may carry a refusal."""

    meta: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Frame:
    """An authenticated payload (empty for a heartbeat; a big one is a view, not a copy)."""

    payload: bytes | memoryview


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer closed the connection cleanly, between frames."""


Event = Hello | Welcome | Frame | Closed

_TRANSITIONS: dict[tuple[Role, State, str], State] = {
    (Role.SERVER, State.AWAIT_RESPONSE, "response"): State.AWAIT_DECISION,
    (Role.SERVER, State.AWAIT_DECISION, "accept"): State.OPEN,
    (Role.SERVER, State.AWAIT_DECISION, "refuse"): State.CLOSED,
    (Role.CLIENT, State.AWAIT_CHALLENGE, "challenge"): State.AWAIT_WELCOME,
    (Role.CLIENT, State.AWAIT_WELCOME, "welcome"): State.OPEN,
    (Role.CLIENT, State.AWAIT_WELCOME, "refused"): State.CLOSED,
    (Role.CLIENT, State.OPEN, "frame"): State.OPEN,
    (Role.SERVER, State.OPEN, "frame"): State.OPEN,
    (Role.CLIENT, State.OPEN, "send"): State.OPEN,
    (Role.SERVER, State.OPEN, "send"): State.OPEN,
    (Role.CLIENT, State.OPEN, "eof"): State.CLOSED,
    (Role.SERVER, State.OPEN, "eof"): State.CLOSED,
}


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


# A tagger is a keyed BLAKE2b state, copied for each frame (cheaper than keying it again).
# A blob of BULK bytes or more is hashed with the bulk digest the server chose for the
# connection, and arrives into a buffer of its own (both in ``bulk``).
BULK = 1 << 16
CHUNK = 1 << 20
_NO_TAGGER = hashlib.blake2b(key=b"not yet derived", digest_size=TAG_SIZE)


def _tagger(key: bytes) -> Any:
    return hashlib.blake2b(key=key, digest_size=TAG_SIZE)


def _tag(tagger: Any, *parts: bytes | bytearray | memoryview) -> bytes:
    digest = tagger.copy()
    for part in parts:
        digest.update(part)
    return digest.digest()  # type: ignore[no-any-return]


def frame_size(payload_size: int) -> int:
    """How many bytes a frame carrying ``payload_size`` bytes takes on the wire."""
    return _HEAD + payload_size + TAG_SIZE


def _encode_meta(meta: Mapping[str, Any]) -> bytes:
    data = json.dumps(dict(meta), separators=(",", ":"), sort_keys=True).encode()
    if len(data) > META_LIMIT:
        raise LocalProtocolError(f"handshake meta is {len(data)} bytes, over {META_LIMIT}")
    return data


def _decode_meta(data: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise RemoteProtocolError("handshake meta is not JSON") from exc
    except RecursionError:  # nested deeper than the parser goes: no names are that deep
        raise RemoteProtocolError("handshake meta is nested too deeply") from None
    if not isinstance(meta, dict):
        raise RemoteProtocolError("handshake meta is not a JSON object")
    return meta


class Connection:
    """One end of one connection, with no I/O.

    Feed received bytes to :meth:`receive_data` (``b""`` for end of file), then call
    :meth:`next_event` until it returns ``None``. Bytes to send accumulate in
    :meth:`data_to_send`, except frames, which :meth:`send` returns directly.

    ``spiller``: where a big blob that arrives is also written while it arrives (a loader
    that keeps big payloads in files: see :data:`clustorage.bulk.SPILLED`).

    Raises (from next_event):
        AuthenticationError: the peer's MAC is wrong (wrong cookie).
        RemoteProtocolError: the peer sent garbage, a forged, replayed or truncated frame.
        FrameTooLarge: a frame's length is over ``max_frame``.
    """

    def __init__(
        self,
        role: Role,
        cookie: bytes,
        meta: Mapping[str, Any],
        *,
        max_frame: int = 1 << 30,
        bulk_digests: Sequence[str] = BULK_DIGESTS,
        binding: bytes = b"",
        spiller: Spiller | None = None,
    ) -> None:
        if not cookie:
            raise LocalProtocolError("an empty cookie cannot authenticate anything")
        self.role = role
        self.max_frame = max_frame
        self._cookie = cookie
        # A client offers the digests it has; the server picks the first of its own it is offered.
        self._bulk_digests = tuple(bulk_digests)
        unknown = [name for name in self._bulk_digests if name not in BULK_DIGESTS]
        if unknown or not self._bulk_digests:
            raise LocalProtocolError(f"unknown bulk digests {unknown}; use some of {BULK_DIGESTS}")
        if role is Role.CLIENT:
            meta = {**meta, "bulk_digests": list(self._bulk_digests)}
        self._meta = _encode_meta(meta)
        self._buffer = bytearray()
        self._outbox = bytearray()
        self._eof = False
        self._snonce = b""
        self._cnonce = b""
        self._client_mac = b""
        self._send_tagger = _NO_TAGGER
        self._recv_tagger = _NO_TAGGER
        self._bulk: ArrivingFrame | None = None
        self._spiller = spiller
        self._binding = b""
        self.tagged = True  # frames carry a tag: False inside TLS (see bind)
        self._tag_size = TAG_SIZE
        if binding:
            self.bind(binding)
        self.bulk_digest = BASELINE_DIGEST
        self._send_seq = 0
        self._recv_seq = 0
        self.peer_meta: dict[str, Any] = {}
        # Client: the server sent REJECT (it refused our cookie), as opposed to a welcome
        # that failed its MAC (the server did not prove the cookie: wrong one, or tampering).
        self.rejected = False
        if role is Role.SERVER:
            self._snonce = secrets.token_bytes(NONCE_SIZE)
            self._outbox += _HELLO.pack(MAGIC, VERSION, self._snonce)
            self.state = State.AWAIT_RESPONSE
        else:
            self.state = State.AWAIT_CHALLENGE

    def __repr__(self) -> str:
        return f"<Connection {self.role.value} {self.state.name}>"

    def bind(self, binding: bytes) -> None:
        """Run over TLS: prove the cookie on the TLS session whose channel binding this is,
        and send and take frames without tags. Before the handshake's MACs (a server can
        bind once its TLS handshake is done, before the client's response is read)."""
        if self._client_mac or not binding:
            raise LocalProtocolError("bind a connection to TLS before its handshake, once")
        self._binding = binding
        self.tagged = False
        self._tag_size = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> Connection:
        """An independent copy (MAC states are not picklable, so copy.deepcopy needs this)."""
        clone = copy.copy(self)
        clone._buffer, clone._outbox = bytearray(self._buffer), bytearray(self._outbox)
        clone.peer_meta = copy.deepcopy(self.peer_meta, memo)
        for name in ("_send_tagger", "_recv_tagger"):
            setattr(clone, name, getattr(self, name).copy())
        if self._bulk is not None:
            clone._bulk = self._bulk.clone()
        return clone

    # -- state ---------------------------------------------------------------------------

    def _move(self, what: str) -> None:
        before = self.state
        try:
            self.state = _TRANSITIONS[(self.role, before, what)]
        except KeyError:
            self.state = State.ERROR
            raise LocalProtocolError(
                f"cannot {what} as {self.role.value} while {before.value}"
            ) from None

    def _fail(self, exc: Exception) -> Exception:
        self._error()
        return exc

    def _error(self) -> None:
        self.state = State.ERROR
        self.release()
        self._bulk = None

    def release(self) -> None:
        """End the hashing of a big frame still arriving, which will not finish now: call
        once the connection is dropped (from any thread)."""
        bulk = self._bulk
        if bulk is not None:
            bulk.abandon()

    # -- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes from the peer; ``b""`` means the peer closed its side."""
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> Event | None:
        """The next event the received bytes complete, or None if more bytes are needed."""
        if self.state is State.ERROR:
            raise LocalProtocolError(f"the {self.role.value} connection is in error")
        try:
            event = self._parse()
        except (RemoteProtocolError, AuthenticationError):
            self._error()
            raise
        if event is None and self._eof and self.state is not State.CLOSED:
            if self._buffer or self._bulk is not None or self.state is not State.OPEN:
                raise self._fail(
                    RemoteProtocolError(f"connection closed while {self.state.value} (truncated)")
                )
            self._move("eof")
            return Closed()
        return event

    def _parse(self) -> Event | None:
        state = self.state
        if state is State.OPEN:
            return self._parse_frame()
        if state is State.AWAIT_RESPONSE:
            return self._parse_response()
        if state is State.AWAIT_CHALLENGE:
            self._parse_challenge()
            return None
        if state is State.AWAIT_WELCOME:
            return self._parse_welcome()
        if self._buffer and state is not State.CLOSED:
            raise RemoteProtocolError(f"unexpected bytes while {state.value}")
        return None

    def _check_magic(self, magic: bytes, version: int) -> None:
        if magic != MAGIC:
            raise RemoteProtocolError("the peer is not speaking the clustorage protocol")
        if version != VERSION:
            raise RemoteProtocolError(
                f"the peer speaks clustorage protocol {version}, this node speaks {VERSION}"
            )

    def _parse_challenge(self) -> None:
        if len(self._buffer) < 4:
            return
        if self._buffer[:4] != MAGIC:
            raise RemoteProtocolError("the peer is not speaking the clustorage protocol")
        if len(self._buffer) < _HELLO.size:
            return
        magic, version, self._snonce = _HELLO.unpack_from(self._buffer)
        del self._buffer[: _HELLO.size]
        self._check_magic(magic, version)
        self._cnonce = secrets.token_bytes(NONCE_SIZE)
        self._client_mac = _mac(
            self._cookie,
            b"clustorage/client",
            self._snonce,
            self._cnonce,
            self._meta,
            self._binding,
        )
        self._outbox += _RESPONSE.pack(
            MAGIC, VERSION, self._cnonce, self._client_mac, len(self._meta)
        )
        self._outbox += self._meta
        self._move("challenge")

    def _parse_response(self) -> Event | None:
        if len(self._buffer) >= 4 and self._buffer[:4] != MAGIC:
            if self._buffer[:2] == b"\x16\x03":  # a TLS handshake record
                raise RemoteProtocolError(
                    "the peer speaks TLS and this loader does not: start the loader with "
                    "--tls-cert/--tls-key/--tls-ca, or the member without them"
                )
            raise RemoteProtocolError("the peer is not speaking the clustorage protocol")
        if len(self._buffer) < _RESPONSE.size:
            return None
        magic, version, cnonce, client_mac, size = _RESPONSE.unpack_from(self._buffer)
        self._check_magic(magic, version)
        if size > META_LIMIT:
            raise RemoteProtocolError(f"handshake meta of {size} bytes is over {META_LIMIT}")
        if len(self._buffer) < _RESPONSE.size + size:
            return None
        meta = bytes(self._buffer[_RESPONSE.size : _RESPONSE.size + size])
        del self._buffer[: _RESPONSE.size + size]
        expected = _mac(
            self._cookie, b"clustorage/client", self._snonce, cnonce, meta, self._binding
        )
        if not hmac.compare_digest(expected, client_mac):
            self._outbox += _REJECT.pack(b"R", 0)
            raise AuthenticationError("the peer does not know the cluster cookie")
        self._cnonce, self._client_mac = cnonce, client_mac
        self.peer_meta = _decode_meta(meta)
        self._move("response")
        return Hello(self.peer_meta)

    def _parse_welcome(self) -> Event | None:
        if not self._buffer:
            return None
        kind = self._buffer[:1]
        if kind == b"R":
            self.rejected = True
            raise AuthenticationError("the loader refused our cookie")
        if kind != b"W":
            raise RemoteProtocolError("the peer answered the handshake with garbage")
        if len(self._buffer) < _WELCOME.size:
            return None
        _, server_mac, size = _WELCOME.unpack_from(self._buffer)
        if size > META_LIMIT:
            raise RemoteProtocolError(f"handshake meta of {size} bytes is over {META_LIMIT}")
        if len(self._buffer) < _WELCOME.size + size:
            return None
        meta = bytes(self._buffer[_WELCOME.size : _WELCOME.size + size])
        del self._buffer[: _WELCOME.size + size]
        expected = _mac(
            self._cookie,
            b"clustorage/server",
            self._snonce,
            self._cnonce,
            self._client_mac,
            meta,
            self._binding,
        )
        if not hmac.compare_digest(expected, server_mac):
            raise AuthenticationError(
                "the loader did not prove it knows the cookie (wrong cookie there, or someone "
                "in between)"
            )
        self.peer_meta = _decode_meta(meta)
        if "error" in self.peer_meta:
            self._move("refused")
        else:
            bulk_digest = self.peer_meta.get("bulk_digest", BASELINE_DIGEST)
            if bulk_digest not in self._bulk_digests:
                raise RemoteProtocolError(
                    f"the loader asked for an unknown bulk digest {bulk_digest!r}"
                )
            self.bulk_digest = bulk_digest
            self._derive_keys()
            self._move("welcome")
        return Welcome(self.peer_meta)

    def _parse_frame(self) -> Frame | None:
        payload = self._next_payload()
        return None if payload is None else Frame(payload)

    def _next_payload(self) -> bytes | memoryview | None:
        if self._bulk is not None:
            return self._continue_bulk()
        buffer = self._buffer
        if len(buffer) < _HEAD:
            return None
        length, seq, blob = HEADER.unpack_from(buffer)
        if length > self.max_frame:
            raise FrameTooLarge(f"a frame of {length} bytes is over the limit of {self.max_frame}")
        if blob:
            if blob > length or length - blob > BULK:
                raise RemoteProtocolError(
                    f"a frame of {length} bytes with a blob of {blob} is malformed "
                    f"(the blob is at most the frame, the rest under {BULK} bytes)"
                )
            try:
                # A member trusts its loader's header; the loader does not let a member's
                # header alone make it stall or hold memory (pages come as bytes do, mapped
                # at most bulk.MAP_AHEAD ahead of them).
                populate = self.role is Role.CLIENT
                algorithm = self.bulk_digest if self.tagged else None
                self._bulk = ArrivingFrame(
                    bytes(buffer[:_HEAD]),
                    length,
                    seq,
                    blob,
                    algorithm,
                    populate,
                    self._spiller,
                )
            except OSError as exc:
                raise FrameTooLarge(f"cannot take a frame of {length} bytes: {exc}") from exc
            del buffer[:_HEAD]
            return self._continue_bulk()
        end = _HEAD + length
        tag_size = self._tag_size
        if len(buffer) < end + tag_size:
            return None
        with memoryview(buffer) as view:
            if tag_size:
                self._check(seq, _tag(self._recv_tagger, view[:end]), view[end : end + tag_size])
            else:
                self._count(seq)
            payload = bytes(view[_HEAD:end])
        del buffer[: end + tag_size]
        return payload

    def _continue_bulk(self) -> memoryview | None:
        bulk = self._bulk
        assert bulk is not None
        buffer = self._buffer
        if bulk.filled < bulk.length and buffer:
            view = memoryview(buffer)
            taken = bulk.feed(view)
            view.release()
            del buffer[:taken]
        if bulk.filled < bulk.length or len(buffer) < self._tag_size:
            return None
        if not self.tagged:
            self._count(bulk.seq)
        else:
            digest = bulk.hasher.digest()
            envelope = memoryview(bulk.data)[: bulk.blob_start]
            tag = _tag(self._recv_tagger, bulk.header, envelope, digest)
            self._check(bulk.seq, tag, buffer[:TAG_SIZE])
            del buffer[:TAG_SIZE]
            VERIFIED.remember(bulk.data, bulk.length - bulk.blob_start, self.bulk_digest, digest)
        self._bulk = None
        bulk.verified()
        return memoryview(bulk.data)

    def _check(self, seq: int, tag: bytes, received: bytes | bytearray | memoryview) -> None:
        if not hmac.compare_digest(tag, received):
            raise RemoteProtocolError(_FORGED)
        self._count(seq)

    def _count(self, seq: int) -> None:
        if seq != self._recv_seq:
            raise RemoteProtocolError(
                f"frame sequence {seq}, expected {self._recv_seq} (replayed or reordered)"
            )
        self._recv_seq += 1

    def receive_buffer(self) -> memoryview | None:
        """Where the next bytes may be received directly (then call :meth:`received_into`):
        the rest of a big payload that is arriving, or None."""
        bulk = self._bulk
        if bulk is None or self._buffer or bulk.filled >= bulk.length:
            return None
        return bulk.room()

    def received_into(self, size: int) -> memoryview | None:
        """``size`` bytes were received into :meth:`receive_buffer`'s view; the payload,
        when they end a frame that has no tag to wait for (inside TLS)."""
        bulk = self._bulk
        if bulk is None or size > bulk.length - bulk.filled:
            raise LocalProtocolError("received_into without a receive_buffer to match")
        bulk.account(size)
        if self.tagged or bulk.filled < bulk.length:
            return None
        return self._continue_bulk()

    def read_frames(self, data: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
        """Take bytes from an open connection's peer; the payloads of the frames they complete.

        The fast path of :meth:`receive_data` plus :meth:`next_event` while OPEN, without
        heartbeats (empty payloads). Raises as :meth:`next_event` does.
        """
        if self.state is not State.OPEN or not data:
            raise LocalProtocolError(f"read_frames needs an open connection and bytes, not {self}")
        try:
            bulk = self._bulk
            if bulk is None and not self._buffer:  # the common case: whole frames, read in place
                payloads, used = self._whole_frames(data)
                if used == len(data):
                    return payloads
                data = memoryview(data)[used:]
            else:
                payloads = []
            if bulk is not None and not self._buffer:  # straight into the blob's buffer
                view = memoryview(data)
                data = view[bulk.feed(view) :]
            self._buffer += data
            while (payload := self._next_payload()) is not None:
                if payload:
                    payloads.append(payload)
        except (RemoteProtocolError, AuthenticationError):
            self._error()
            raise
        return payloads

    def _whole_frames(
        self, data: bytes | bytearray | memoryview
    ) -> tuple[list[bytes | memoryview], int]:
        """The payloads of the small frames wholly inside ``data``, and the bytes they took;
        stops at anything else (a partial frame, a bulk frame), which the buffer takes."""
        payloads: list[bytes | memoryview] = []
        size = len(data)
        start = 0
        tagger, max_frame, tag_size = self._recv_tagger, self.max_frame, self._tag_size
        while size - start >= _HEAD:
            length, seq, blob = _unpack_header(data, start)
            body = start + _HEAD
            end = body + length
            if blob or length > max_frame or end + tag_size > size:
                break
            if tag_size:
                digest = tagger.copy()
                digest.update(data[start:end])
                if not _compare_digest(digest.digest(), data[end : end + tag_size]):
                    raise RemoteProtocolError(_FORGED)
            if seq != self._recv_seq:
                self._count(seq)  # raises
            self._recv_seq = seq + 1
            if length:
                payloads.append(bytes(data[body:end]))
            start = end + tag_size
        return payloads, start

    # -- output --------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Handshake bytes waiting to be sent (empty when there are none)."""
        data = bytes(self._outbox)
        self._outbox.clear()
        return data

    def accept(self, meta: Mapping[str, Any]) -> None:
        """Server: welcome the authenticated client with our own ``meta``."""
        offered = self.peer_meta.get("bulk_digests")
        if not isinstance(offered, list):
            offered = [BASELINE_DIGEST]
        self.bulk_digest = next(
            (name for name in self._bulk_digests if name in offered), BASELINE_DIGEST
        )
        welcome = self._welcome({**meta, "bulk_digest": self.bulk_digest})
        self._move("accept")
        self._derive_keys()
        self._outbox += welcome

    def refuse(self, reason: str, **details: Any) -> None:
        """Server: tell the authenticated client why it is refused; the connection ends."""
        welcome = self._welcome({"error": reason, **details})
        self._move("refuse")
        self._outbox += welcome

    def _welcome(self, meta: Mapping[str, Any]) -> bytes:
        data = _encode_meta(meta)
        server_mac = _mac(
            self._cookie,
            b"clustorage/server",
            self._snonce,
            self._cnonce,
            self._client_mac,
            data,
            self._binding,
        )
        return _WELCOME.pack(b"W", server_mac, len(data)) + data

    def _derive_keys(self) -> None:
        session = _mac(
            self._cookie, b"clustorage/session", self._snonce, self._cnonce, self._binding
        )
        to_server = _mac(session, b"client-to-server")
        to_client = _mac(session, b"server-to-client")
        send_key, recv_key = (
            (to_server, to_client) if self.role is Role.CLIENT else (to_client, to_server)
        )
        self._send_tagger = _tagger(send_key)
        self._recv_tagger = _tagger(recv_key)

    def check_length(self, length: int) -> None:
        """Raise LocalProtocolError if a frame carrying ``length`` bytes is over the limit."""
        if length > self.max_frame:
            raise LocalProtocolError(
                f"cannot send a frame of {length} bytes: the limit is {self.max_frame}"
            )

    def _header(self, length: int, blob: int) -> bytes:
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot send as {self.role.value} while {self.state.value}")
        self.check_length(length)
        header = HEADER.pack(length, self._send_seq, blob)
        self._send_seq += 1
        return header

    def send(self, payload: bytes) -> bytes:
        """The bytes of one frame carrying ``payload``; send them whole, in order.

        Raises:
            LocalProtocolError: the connection is not open, or the payload is over the limit.
        """
        return self._small(payload)

    def send_small(self, envelope: bytes, blob: Payload) -> bytes:
        """The bytes of one plain frame carrying ``envelope`` then ``blob`` (of fewer than
        BULK bytes, or behind an envelope over BULK bytes); send them whole, in order."""
        if not blob:
            return self._small(envelope)
        return self._small(envelope, blob.parts if isinstance(blob, Gathered) else (blob,))

    def _small(self, envelope: bytes, blob: tuple[Blob, ...] = ()) -> bytes:
        """One plain frame of ``envelope`` and the buffers of ``blob``: as :meth:`send`, made
        in one pass (the hot path of every request and answer)."""
        length = len(envelope) + sum(map(len, blob)) if blob else len(envelope)
        if self.state is not State.OPEN or length > self.max_frame:
            self._header(length, 0)  # raises, saying why
        frame = b"".join((HEADER.pack(length, self._send_seq, 0), envelope, *blob))
        self._send_seq += 1
        if not self.tagged:
            return frame
        digest = self._send_tagger.copy()
        digest.update(frame)
        return frame + digest.digest()

    def send_message(self, envelope: bytes, blob: Payload) -> Iterator[bytes | memoryview]:
        """The parts of the frame carrying ``envelope`` then ``blob``: one part for a small
        one (or one whose envelope is over BULK bytes, which a bulk frame cannot carry),
        :meth:`send_bulk`'s parts for a blob of BULK bytes or more."""
        if len(blob) < BULK or len(envelope) > BULK:
            return iter((self.send_small(envelope, blob),))
        return self.send_bulk(envelope, blob)

    def send_bulk(self, envelope: bytes, blob: Payload) -> Iterator[bytes | memoryview]:
        """The parts of one frame carrying ``envelope`` then ``blob``: send each, in order.

        The frame takes its sequence number now; its parts are made as they are asked for.
        The blob goes out in CHUNK-sized parts, hashed as they are produced (unless this
        process verified that blob already), so the peer hashes its start while this end
        hashes its end. Send every part before anything sent later.
        """
        header = self._header(len(envelope) + len(blob), len(blob))
        return self._bulk_parts(header, envelope, blob)

    def _bulk_parts(
        self, header: bytes, envelope: bytes, blob: Payload
    ) -> Iterator[bytes | memoryview]:
        yield header + envelope
        if not self.tagged:
            for part in blob.parts if isinstance(blob, Gathered) else (blob,):
                view = memoryview(part)
                for start in range(0, len(view), CHUNK):
                    yield view[start : start + CHUNK]
            return
        if isinstance(blob, Gathered):
            parts, digest = blob.parts, None
        else:
            parts, digest = (blob,), VERIFIED.find(blob, self.bulk_digest)
        hasher = None if digest is not None else sending_hasher(self.bulk_digest, len(blob))
        try:
            for part in parts:
                view = memoryview(part)
                for start in range(0, len(view), CHUNK):
                    chunk = view[start : start + CHUNK]
                    if hasher is not None:
                        hasher.update(chunk)
                    yield chunk
            if hasher is not None:
                digest = hasher.digest()
        finally:
            if hasher is not None and digest is None:  # the frame was cut short
                abandon_hashing(hasher)
        assert digest is not None
        yield _tag(self._send_tagger, header, envelope, digest)

    def heartbeat(self) -> bytes:
        """The bytes of an empty frame: proof of life, ignored by the peer's application."""
        return self.send(b"")
