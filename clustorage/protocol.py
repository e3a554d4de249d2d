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

Both sides then derive one key per direction from the cookie and both nonces. A frame is::

    length (u32) | sequence (u64) | tag (32 bytes) | payload

where the tag is keyed BLAKE2b over length, sequence and payload. The length is checked against
the limit before the payload is read; a wrong sequence number (replay, reorder, drop) or tag
(forgery, corruption) is the peer's fault and ends the connection. An empty payload is a
heartbeat.

Every state change is in ``_TRANSITIONS``; anything else raises, naming role and state.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import (
    AuthenticationError,
    FrameTooLarge,
    LocalProtocolError,
    RemoteProtocolError,
)

__all__ = [
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
]

MAGIC = b"CLST"
VERSION = 1
NONCE_SIZE = 32
MAC_SIZE = 32
TAG_SIZE = 32
META_LIMIT = 4096
HEADER = struct.Struct("!IQ")
_HELLO = struct.Struct(f"!4sH{NONCE_SIZE}s")
_RESPONSE = struct.Struct(f"!4sH{NONCE_SIZE}s{MAC_SIZE}sH")
_WELCOME = struct.Struct(f"!c{MAC_SIZE}sH")
_REJECT = struct.Struct("!cH")
_FRAME_HEAD = HEADER.size + TAG_SIZE


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
    """An authenticated payload (empty for a heartbeat)."""

    payload: bytes


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
    if not isinstance(meta, dict):
        raise RemoteProtocolError("handshake meta is not a JSON object")
    return meta


class Connection:
    """One end of one connection, with no I/O.

    Feed received bytes to :meth:`receive_data` (``b""`` for end of file), then call
    :meth:`next_event` until it returns ``None``. Bytes to send accumulate in
    :meth:`data_to_send`, except frames, which :meth:`send` returns directly.

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
    ) -> None:
        if not cookie:
            raise LocalProtocolError("an empty cookie cannot authenticate anything")
        self.role = role
        self.max_frame = max_frame
        self._cookie = cookie
        self._meta = _encode_meta(meta)
        self._buffer = bytearray()
        self._outbox = bytearray()
        self._eof = False
        self._snonce = b""
        self._cnonce = b""
        self._client_mac = b""
        self._send_key = b""
        self._recv_key = b""
        self._send_seq = 0
        self._recv_seq = 0
        self.peer_meta: dict[str, Any] = {}
        if role is Role.SERVER:
            self._snonce = secrets.token_bytes(NONCE_SIZE)
            self._outbox += _HELLO.pack(MAGIC, VERSION, self._snonce)
            self.state = State.AWAIT_RESPONSE
        else:
            self.state = State.AWAIT_CHALLENGE

    def __repr__(self) -> str:
        return f"<Connection {self.role.value} {self.state.name}>"

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
        self.state = State.ERROR
        return exc

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
            self.state = State.ERROR
            raise
        if event is None and self._eof and self.state is not State.CLOSED:
            if self._buffer or self.state is not State.OPEN:
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
            self._cookie, b"clustorage/client", self._snonce, self._cnonce, self._meta
        )
        self._outbox += _RESPONSE.pack(
            MAGIC, VERSION, self._cnonce, self._client_mac, len(self._meta)
        )
        self._outbox += self._meta
        self._move("challenge")

    def _parse_response(self) -> Event | None:
        if len(self._buffer) >= 4 and self._buffer[:4] != MAGIC:
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
        expected = _mac(self._cookie, b"clustorage/client", self._snonce, cnonce, meta)
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
        )
        if not hmac.compare_digest(expected, server_mac):
            raise AuthenticationError("the loader does not know the cluster cookie")
        self.peer_meta = _decode_meta(meta)
        if "error" in self.peer_meta:
            self._move("refused")
        else:
            self._derive_keys()
            self._move("welcome")
        return Welcome(self.peer_meta)

    def _parse_frame(self) -> Frame | None:
        buffer = self._buffer
        if len(buffer) < HEADER.size:
            return None
        length, seq = HEADER.unpack_from(buffer)
        if length > self.max_frame:
            raise FrameTooLarge(f"a frame of {length} bytes is over the limit of {self.max_frame}")
        end = _FRAME_HEAD + length
        if len(buffer) < end:
            return None
        with memoryview(buffer) as view:
            tag = self._tag(self._recv_key, view[: HEADER.size], view[_FRAME_HEAD:end])
            if not hmac.compare_digest(tag, view[HEADER.size : _FRAME_HEAD]):
                raise RemoteProtocolError("a frame failed authentication (forged or corrupted)")
            if seq != self._recv_seq:
                raise RemoteProtocolError(
                    f"frame sequence {seq}, expected {self._recv_seq} (replayed or reordered)"
                )
            payload = bytes(view[_FRAME_HEAD:end])
        self._recv_seq += 1
        del buffer[:end]
        return Frame(payload)

    # -- output --------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Handshake bytes waiting to be sent (empty when there are none)."""
        data = bytes(self._outbox)
        self._outbox.clear()
        return data

    def accept(self, meta: Mapping[str, Any]) -> None:
        """Server: welcome the authenticated client with our own ``meta``."""
        welcome = self._welcome(meta)
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
        )
        return _WELCOME.pack(b"W", server_mac, len(data)) + data

    def _derive_keys(self) -> None:
        session = _mac(self._cookie, b"clustorage/session", self._snonce, self._cnonce)
        to_server = _mac(session, b"client-to-server")
        to_client = _mac(session, b"server-to-client")
        if self.role is Role.CLIENT:
            self._send_key, self._recv_key = to_server, to_client
        else:
            self._send_key, self._recv_key = to_client, to_server

    @staticmethod
    def _tag(key: bytes, header: bytes | memoryview, payload: bytes | memoryview) -> bytes:
        digest = hashlib.blake2b(header, key=key, digest_size=TAG_SIZE)
        digest.update(payload)
        return digest.digest()

    def send(self, payload: bytes) -> bytes:
        """The bytes of one frame carrying ``payload``; send them whole, in order.

        Raises:
            LocalProtocolError: the connection is not open.
            FrameTooLarge: the payload is over the limit the peer accepts.
        """
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot send as {self.role.value} while {self.state.value}")
        if len(payload) > self.max_frame:
            raise LocalProtocolError(
                f"cannot send a frame of {len(payload)} bytes: the limit is {self.max_frame}"
            )
        header = HEADER.pack(len(payload), self._send_seq)
        self._send_seq += 1
        return b"".join((header, self._tag(self._send_key, header, payload), payload))

    def heartbeat(self) -> bytes:
        """The bytes of an empty frame: proof of life, ignored by the peer's application."""
        return self.send(b"")
