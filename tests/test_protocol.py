"""The sans-I/O Connection, bytes in and bytes out: handshake, frames, state table."""

from __future__ import annotations

import copy
import gc
import hashlib
import hmac
import mmap
import os
import random
import signal
import struct
import threading
import time
import weakref

import psutil
import pytest

import clustorage.bulk
import clustorage.protocol
from clustorage import codec
from clustorage.bulk import RecycledBuffers, VerifiedDigests, bulk_digests_by_speed
from clustorage.errors import (
    AuthenticationError,
    FrameTooLarge,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from clustorage.messages import Gathered
from clustorage.protocol import (
    BASELINE_DIGEST,
    BULK,
    BULK_DIGESTS,
    CHUNK,
    HEADER,
    MAGIC,
    TAG_SIZE,
    VERSION,
    Closed,
    Connection,
    Frame,
    Hello,
    Role,
    State,
    Welcome,
)
from tests.protocol_helpers import (
    CLIENT_META,
    COOKIE,
    SERVER_META,
    ConnectionPair,
    drain,
    flip,
)

# Wire layout, as the theory of operation in protocol.py describes it.
NONCE = 32
MAC = 32
CHALLENGE = struct.Struct(f"!4sH{NONCE}s")
RESPONSE = struct.Struct(f"!4sH{NONCE}s{MAC}sH")
WELCOME = struct.Struct(f"!c{MAC}sH")
FRAME_HEAD = HEADER.size
OTHER_COOKIE = b"some-other-cookie"


def open_pair(**kwargs: object) -> ConnectionPair:
    """A pair whose handshake has completed."""
    pair = ConnectionPair(**kwargs)  # type: ignore[arg-type]
    pair.open()
    return pair


def server_mac(
    cookie: bytes, snonce: bytes, cnonce: bytes, client_mac: bytes, meta: bytes
) -> bytes:
    """The WELCOME MAC as protocol.py documents it."""
    data = b"clustorage/server" + snonce + cnonce + client_mac + meta
    return hmac.new(cookie, data, hashlib.sha256).digest()


def hand_welcome(cookie: bytes, challenge: bytes, response: bytes, meta: bytes) -> bytes:
    """A WELCOME built by hand from the recorded challenge and response, MAC'd with ``cookie``."""
    _, _, snonce = CHALLENGE.unpack_from(challenge)
    _, _, cnonce, client_mac, _ = RESPONSE.unpack_from(response)
    mac = server_mac(cookie, snonce, cnonce, client_mac, meta)
    return WELCOME.pack(b"W", mac, len(meta)) + meta


# -- handshake -----------------------------------------------------------------------------


def test_server_sends_challenge_on_construction() -> None:
    """A new server has its challenge (magic, version, nonce) waiting, once."""
    server = Connection(Role.SERVER, COOKIE, SERVER_META)
    challenge = server.data_to_send()
    assert len(challenge) == CHALLENGE.size
    magic, version, nonce = CHALLENGE.unpack(challenge)
    assert (magic, version) == (MAGIC, VERSION)
    assert nonce != bytes(NONCE)
    assert server.data_to_send() == b""
    assert server.state is State.AWAIT_RESPONSE


def test_challenge_nonces_are_fresh() -> None:
    """Two servers never send the same nonce."""
    one = Connection(Role.SERVER, COOKIE, SERVER_META).data_to_send()
    two = Connection(Role.SERVER, COOKIE, SERVER_META).data_to_send()
    assert one[-NONCE:] != two[-NONCE:]


def test_client_waits_silently_for_the_challenge() -> None:
    """A new client has nothing to send and no event until the challenge arrives."""
    client = Connection(Role.CLIENT, COOKIE, CLIENT_META)
    assert client.data_to_send() == b""
    assert client.next_event() is None
    assert client.state is State.AWAIT_CHALLENGE


@pytest.mark.parametrize("chunk", [0, 1, 7])
def test_handshake_completes_and_frames_flow(chunk: int) -> None:
    """Hello carries the client's meta, Welcome the server's; frames flow both ways."""
    pair = ConnectionPair(chunk=chunk)
    hello, welcome = pair.open()
    offered = {**CLIENT_META, "bulk_digests": list(BULK_DIGESTS)}
    chosen = {**SERVER_META, "bulk_digest": BULK_DIGESTS[0]}
    assert hello == Hello(offered)
    assert welcome == Welcome(chosen)
    assert pair.server.peer_meta == offered
    assert pair.client.peer_meta == chosen
    assert pair.send(Role.CLIENT, b"ping") == [Frame(b"ping")]
    assert pair.send(Role.SERVER, b"pong") == [Frame(b"pong")]
    big = bytes(range(256)) * 100
    assert pair.send(Role.CLIENT, big) == [Frame(big)]
    assert pair.send(Role.SERVER, big) == [Frame(big)]


def test_welcome_and_frames_in_one_read() -> None:
    """Frames the server sends right after accepting arrive with the Welcome, in order."""
    pair = ConnectionPair()
    pair.start()
    pair.server.accept(SERVER_META)
    data = pair.server.data_to_send() + pair.server.send(b"one") + pair.server.send(b"two")
    assert pair.deliver(Role.SERVER, data) == [
        Welcome({**SERVER_META, "bulk_digest": BULK_DIGESTS[0]}),
        Frame(b"one"),
        Frame(b"two"),
    ]


def test_many_frames_in_one_read() -> None:
    """Several frames delivered in one chunk come out as several events, in order."""
    pair = open_pair()
    payloads = [b"a", b"", b"bc" * 1000, b"d"]
    data = b"".join(pair.client.send(p) for p in payloads)
    assert pair.deliver(Role.CLIENT, data) == [Frame(p) for p in payloads]


def test_frame_layout_matches_theory_of_operation() -> None:
    """A frame is length | sequence | blob length | payload | keyed BLAKE2b tag, keys derived
    per direction."""
    pair = open_pair()
    frames = [pair.client.send(b"x" * n) for n in (0, 1, 300)]
    challenge, response = pair.sent[Role.SERVER][0], pair.sent[Role.CLIENT][0]
    snonce, cnonce = challenge[-NONCE:], response[6 : 6 + NONCE]
    session = hmac.new(COOKIE, b"clustorage/session" + snonce + cnonce, hashlib.sha256).digest()
    key = hmac.new(session, b"client-to-server", hashlib.sha256).digest()
    for seq, (n, frame) in enumerate(zip((0, 1, 300), frames, strict=True)):
        assert HEADER.unpack_from(frame) == (n, seq, 0)
        assert len(frame) == FRAME_HEAD + n + TAG_SIZE
        tag = hashlib.blake2b(frame[:-TAG_SIZE], key=key, digest_size=TAG_SIZE)
        assert frame[-TAG_SIZE:] == tag.digest()


def test_heartbeat_arrives_as_empty_frame() -> None:
    """A heartbeat is a frame with an empty payload, in both directions."""
    pair = open_pair()
    assert pair.deliver(Role.CLIENT, pair.client.heartbeat()) == [Frame(b"")]
    assert pair.deliver(Role.SERVER, pair.server.heartbeat()) == [Frame(b"")]
    assert pair.send(Role.CLIENT, b"after") == [Frame(b"after")]


# -- cookie ---------------------------------------------------------------------------------


def test_wrong_cookie_fails_on_both_sides() -> None:
    """The server raises AuthenticationError and queues a REJECT; the client then raises too."""
    pair = ConnectionPair(server_cookie=OTHER_COOKIE)
    pair.flush(Role.SERVER)
    with pytest.raises(AuthenticationError):
        pair.flush(Role.CLIENT)
    assert pair.server.state is State.ERROR
    reject = pair.server.data_to_send()
    assert reject
    with pytest.raises(AuthenticationError):
        pair.deliver(Role.SERVER, reject)
    assert pair.client.state is State.ERROR


def test_cookie_never_on_the_wire() -> None:
    """No byte either side sends contains the cookie, whether the handshake succeeds or not."""
    good = open_pair()
    good.send(Role.CLIENT, b"payload")
    good.send(Role.SERVER, b"payload")
    bad = ConnectionPair(server_cookie=OTHER_COOKIE)
    bad.flush(Role.SERVER)
    with pytest.raises(AuthenticationError):
        bad.flush(Role.CLIENT)
    with pytest.raises(AuthenticationError):
        bad.deliver(Role.SERVER, bad.server.data_to_send())
    for wire in (good.all_bytes(), bad.all_bytes()):
        assert COOKIE not in wire
        assert COOKIE.hex().encode() not in wire
        assert OTHER_COOKIE not in wire


def test_replayed_handshake_response_is_rejected() -> None:
    """A client RESPONSE recorded once fails against a new server's fresh nonce."""
    pair = open_pair()
    recorded = pair.sent[Role.CLIENT][0]
    server = Connection(Role.SERVER, COOKIE, SERVER_META)
    server.data_to_send()
    server.receive_data(recorded)
    with pytest.raises(AuthenticationError):
        server.next_event()
    assert server.state is State.ERROR


def test_replayed_welcome_is_rejected() -> None:
    """A WELCOME recorded in one session fails in another (the nonces differ)."""
    first = open_pair()
    recorded = first.sent[Role.SERVER][1]
    second = ConnectionPair()
    second.start()
    with pytest.raises(AuthenticationError):
        second.deliver(Role.SERVER, recorded)


def test_welcome_mac_made_with_another_cookie_is_rejected() -> None:
    """The client checks the server's MAC: a WELCOME MAC'd with another cookie fails."""
    pair = ConnectionPair()
    pair.start()
    challenge, response = pair.sent[Role.SERVER][0], pair.sent[Role.CLIENT][0]
    meta = b'{"name":"app1"}'
    genuine = ConnectionPair()
    genuine.start()
    good = hand_welcome(COOKIE, genuine.sent[Role.SERVER][0], genuine.sent[Role.CLIENT][0], meta)
    assert genuine.deliver(Role.SERVER, good) == [Welcome({"name": "app1"})]
    forged = hand_welcome(OTHER_COOKIE, challenge, response, meta)
    with pytest.raises(AuthenticationError):
        pair.deliver(Role.SERVER, forged)
    assert pair.client.state is State.ERROR


def test_welcome_with_tampered_meta_is_rejected() -> None:
    """Changing the server meta in flight breaks the MAC."""
    pair = ConnectionPair()
    pair.start()
    pair.server.accept({"name": "app1"})
    welcome = pair.server.data_to_send()
    tampered = welcome.replace(b"app1", b"app9")
    with pytest.raises(AuthenticationError):
        pair.deliver(Role.SERVER, tampered)


def test_response_with_tampered_meta_is_rejected() -> None:
    """Changing the client meta in flight breaks the MAC: no Hello, AuthenticationError."""
    pair = ConnectionPair(client_meta={"name": "app2"})
    pair.flush(Role.SERVER)
    response = pair.client.data_to_send()
    with pytest.raises(AuthenticationError):
        pair.deliver(Role.CLIENT, response.replace(b"app2", b"app9"))


def test_empty_cookie_is_refused() -> None:
    """A Connection cannot be made with an empty cookie."""
    with pytest.raises(LocalProtocolError):
        Connection(Role.CLIENT, b"", CLIENT_META)


# -- refusal and meta limits ------------------------------------------------------------------


def test_refusal_arrives_as_welcome_with_error() -> None:
    """refuse() sends an authenticated Welcome whose meta carries the error; both sides close."""
    pair = ConnectionPair()
    pair.start()
    pair.server.refuse("name clash", kind="name_clash")
    events = pair.flush(Role.SERVER)
    assert events == [Welcome({"error": "name clash", "kind": "name_clash"})]
    assert isinstance(events[0], Welcome)
    assert events[0].meta["error"] == "name clash"
    assert pair.client.state is State.CLOSED
    assert pair.server.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        pair.client.send(b"x")
    with pytest.raises(LocalProtocolError):
        pair.server.send(b"x")


def test_client_meta_over_limit_is_refused_locally() -> None:
    """A client cannot even be built with handshake meta over the limit."""
    with pytest.raises(LocalProtocolError, match="meta"):
        Connection(Role.CLIENT, COOKIE, {"name": "x" * 5000})


def test_response_announcing_oversized_meta_raises() -> None:
    """A RESPONSE announcing meta over the limit fails before the meta arrives."""
    server = Connection(Role.SERVER, COOKIE, SERVER_META)
    server.data_to_send()
    server.receive_data(RESPONSE.pack(MAGIC, VERSION, bytes(NONCE), bytes(MAC), 60000))
    with pytest.raises(RemoteProtocolError, match="meta"):
        server.next_event()


def test_welcome_announcing_oversized_meta_raises() -> None:
    """A WELCOME announcing meta over the limit fails before the meta arrives."""
    pair = ConnectionPair()
    pair.start()
    with pytest.raises(RemoteProtocolError, match="meta"):
        pair.deliver(Role.SERVER, WELCOME.pack(b"W", bytes(MAC), 60000))


def test_accept_with_oversized_meta_leaves_connection_unusable() -> None:
    """accept() with meta over the limit raises, and the server cannot then send frames."""
    pair = ConnectionPair()
    pair.start()
    with pytest.raises(LocalProtocolError, match="meta"):
        pair.server.accept({"name": "x" * 5000})
    assert pair.server.data_to_send() == b""
    with pytest.raises(LocalProtocolError):
        pair.server.send(b"would be tagged with no key")


# -- frames: integrity ------------------------------------------------------------------------

FRAME_PAYLOAD = b"the quick brown fox"
FRAME_LENGTH = FRAME_HEAD + len(FRAME_PAYLOAD) + TAG_SIZE
TAMPER_INDICES = [*range(HEADER.size), FRAME_HEAD, FRAME_LENGTH - TAG_SIZE, FRAME_LENGTH - 1]


def assert_refused(pair: ConnectionPair, data: bytes) -> None:
    """The server, fed ``data`` then end of file, raises a protocol error and stays in error."""
    pair.server.receive_data(data)
    pair.server.receive_data(b"")
    with pytest.raises(ProtocolError):
        drain(pair.server)
    assert pair.server.state is State.ERROR


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
@pytest.mark.parametrize("index", TAMPER_INDICES)
def test_tampered_frame_raises(index: int, mask: int) -> None:
    """Flipping bits anywhere in a frame (header, tag, payload) never yields a Frame."""
    pair = open_pair()
    frame = pair.client.send(FRAME_PAYLOAD)
    assert len(frame) == FRAME_LENGTH
    assert_refused(pair, flip(frame, index, mask))


def test_tampered_tag_raises_without_eof() -> None:
    """A frame with a wrong tag raises as soon as it is complete."""
    pair = open_pair()
    frame = pair.client.send(b"data")
    with pytest.raises(RemoteProtocolError, match="authentication"):
        pair.deliver(Role.CLIENT, flip(frame, HEADER.size))


def test_replayed_frame_raises() -> None:
    """The same frame fed twice: the first is delivered, the second raises."""
    pair = open_pair()
    frame = pair.client.send(b"once")
    assert pair.deliver(Role.CLIENT, frame) == [Frame(b"once")]
    with pytest.raises(RemoteProtocolError, match="sequence"):
        pair.deliver(Role.CLIENT, frame)


def test_reordered_frames_raise() -> None:
    """Frames 0 and 1 delivered as 1 then 0 raise on the first."""
    pair = open_pair()
    first, second = pair.client.send(b"first"), pair.client.send(b"second")
    with pytest.raises(RemoteProtocolError, match="sequence"):
        pair.deliver(Role.CLIENT, second + first)


def test_dropped_frame_raises() -> None:
    """A missing frame is noticed at the next one."""
    pair = open_pair()
    pair.client.send(b"lost")
    with pytest.raises(RemoteProtocolError, match="sequence"):
        pair.deliver(Role.CLIENT, pair.client.send(b"next"))


def test_reflected_frame_is_rejected() -> None:
    """Keys are per direction: a frame fed back to its sender fails authentication."""
    pair = open_pair()
    frame = pair.client.send(b"mirror")
    pair.client.receive_data(frame)
    with pytest.raises(RemoteProtocolError):
        pair.client.next_event()
    other = open_pair()
    frame = other.server.send(b"mirror")
    other.server.receive_data(frame)
    with pytest.raises(RemoteProtocolError):
        other.server.next_event()


def test_frame_from_another_session_is_rejected() -> None:
    """Keys are per connection: a frame from one session fails in another."""
    one, two = open_pair(), open_pair()
    with pytest.raises(RemoteProtocolError):
        two.deliver(Role.CLIENT, one.client.send(b"elsewhere"))


def test_frame_over_limit_raises_once_header_is_in() -> None:
    """A length over max_frame raises FrameTooLarge from the header alone."""
    pair = open_pair(max_frame=1024)
    pair.server.receive_data(HEADER.pack(1025, 0, 0))
    with pytest.raises(FrameTooLarge):
        pair.server.next_event()


def test_frame_over_limit_raises_before_body() -> None:
    """A length over max_frame raises FrameTooLarge before the body arrives."""
    pair = open_pair(max_frame=1024)
    pair.server.receive_data(HEADER.pack(1 << 31, 0, 0) + bytes(TAG_SIZE))
    with pytest.raises(FrameTooLarge):
        pair.server.next_event()
    assert pair.server.state is State.ERROR


def test_frame_at_limit_is_accepted() -> None:
    """A payload exactly max_frame bytes long travels."""
    pair = open_pair(max_frame=1024)
    assert pair.send(Role.CLIENT, b"z" * 1024) == [Frame(b"z" * 1024)]


def test_send_over_limit_raises() -> None:
    """send() refuses a payload over max_frame instead of producing a frame the peer rejects."""
    pair = open_pair(max_frame=1024)
    with pytest.raises(ProtocolError):
        pair.client.send(b"z" * 1025)


# -- end of file ------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, HEADER.size - 1, HEADER.size, FRAME_HEAD + 3, FRAME_LENGTH - 1])
def test_truncated_frame_then_eof_raises(cut: int) -> None:
    """A frame cut short by end of file raises RemoteProtocolError, never a Frame."""
    pair = open_pair()
    frame = pair.client.send(FRAME_PAYLOAD)
    assert pair.deliver(Role.CLIENT, frame[:cut]) == []
    with pytest.raises(RemoteProtocolError, match="truncated"):
        pair.close(Role.CLIENT)


def test_clean_eof_between_frames_gives_closed() -> None:
    """End of file after whole frames: the frames, then Closed, then nothing more."""
    pair = open_pair()
    pair.server.receive_data(pair.client.send(b"last"))
    pair.server.receive_data(b"")
    assert drain(pair.server) == [Frame(b"last"), Closed()]
    assert pair.server.state is State.CLOSED
    assert pair.server.next_event() is None
    assert pair.close(Role.SERVER) == [Closed()]
    assert pair.client.state is State.CLOSED


@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER])
def test_eof_during_handshake_raises(role: Role) -> None:
    """A peer that closes before the handshake ends is a truncation, not a clean close."""
    pair = ConnectionPair()
    pair.conn(role).receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        pair.conn(role).next_event()


# -- garbage before the handshake -------------------------------------------------------------

_RNG = random.Random(4370)
GARBAGE = [
    b"GET / HTTP/1.1\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.6\r\n",
    bytes(200),
    b"\xff" * 200,
    bytes(_RNG.randrange(256) for _ in range(300)),
    bytes(_RNG.randrange(256) for _ in range(5)),
    MAGIC + struct.pack("!H", VERSION + 1) + bytes(200),
]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_before_handshake_server(garbage: bytes) -> None:
    """The server raises RemoteProtocolError on garbage, without ever producing a Hello."""
    server = Connection(Role.SERVER, COOKIE, SERVER_META)
    server.data_to_send()
    server.receive_data(garbage)
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        drain(server)
    assert server.state is State.ERROR
    assert server.peer_meta == {}


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_instead_of_challenge(garbage: bytes) -> None:
    """A client fed garbage instead of a challenge raises and sends nothing."""
    client = Connection(Role.CLIENT, COOKIE, CLIENT_META)
    client.receive_data(garbage)
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        drain(client)
    assert client.data_to_send() == b""


def test_http_request_fails_at_its_fourth_byte() -> None:
    """A server knows a peer is not speaking the protocol from the first four bytes."""
    server = Connection(Role.SERVER, COOKIE, SERVER_META)
    server.receive_data(b"GET ")
    with pytest.raises(RemoteProtocolError, match="not speaking"):
        server.next_event()


def test_garbage_instead_of_welcome() -> None:
    """A client awaiting the welcome rejects anything but W or R."""
    pair = ConnectionPair()
    pair.start()
    with pytest.raises(RemoteProtocolError):
        pair.deliver(Role.SERVER, b"HTTP/1.1 400 Bad Request\r\n\r\n")


def test_bytes_while_server_decides_raise() -> None:
    """A client that sends before it is welcomed is breaking the protocol."""
    pair = ConnectionPair()
    pair.start()
    with pytest.raises(RemoteProtocolError):
        pair.deliver(Role.CLIENT, b"early")


# -- the state table --------------------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER])
def test_send_before_open_raises(role: Role) -> None:
    """send() and heartbeat() before OPEN raise LocalProtocolError naming role and state."""
    pair = ConnectionPair()
    conn = pair.conn(role)
    with pytest.raises(LocalProtocolError, match=role.value) as info:
        conn.send(b"too early")
    assert conn.state.value in str(info.value)
    with pytest.raises(LocalProtocolError):
        conn.heartbeat()


def test_send_while_server_decides_raises() -> None:
    """The server cannot send frames between Hello and accept()."""
    pair = ConnectionPair()
    pair.start()
    with pytest.raises(LocalProtocolError, match="deciding"):
        pair.server.send(b"x")


ILLEGAL_CALLS = [
    ("new client accepts", lambda p: p.client.accept({}), "client", "awaiting the challenge"),
    ("new client refuses", lambda p: p.client.refuse("no"), "client", "awaiting the challenge"),
    ("new server accepts", lambda p: p.server.accept({}), "server", "awaiting the response"),
    ("open server accepts", lambda p: (p.open(), p.server.accept({})), "server", "open"),
    ("open server refuses", lambda p: (p.open(), p.server.refuse("no")), "server", "open"),
]


@pytest.mark.parametrize(
    ("call", "role", "state"),
    [case[1:] for case in ILLEGAL_CALLS],
    ids=[case[0] for case in ILLEGAL_CALLS],
)
def test_illegal_call_names_role_and_state(call: object, role: str, state: str) -> None:
    """A call the state table does not allow raises LocalProtocolError naming role and state."""
    pair = ConnectionPair()
    with pytest.raises(LocalProtocolError) as info:
        call(pair)  # type: ignore[operator]
    message = str(info.value)
    assert role in message
    assert state in message


def test_next_event_after_error_raises() -> None:
    """Once a connection has failed, asking it for more events is our bug."""
    pair = open_pair()
    frame = pair.client.send(b"x")
    with pytest.raises(RemoteProtocolError):
        pair.deliver(Role.CLIENT, flip(frame, HEADER.size))
    with pytest.raises(LocalProtocolError, match="error"):
        pair.server.next_event()


# -- bulk frames ------------------------------------------------------------------------------


def bulk_frame(pair: ConnectionPair, envelope: bytes, blob: bytes, by: Role = Role.CLIENT) -> bytes:
    """The bytes of one bulk frame the client (or ``by``) sends."""
    sender = pair.client if by is Role.CLIENT else pair.server
    return b"".join(bytes(part) for part in sender.send_bulk(envelope, blob))


@pytest.mark.parametrize("bulk_digest", BULK_DIGESTS)
@pytest.mark.parametrize("chunk", [0, 4099])
def test_bulk_frames_use_the_servers_digest(bulk_digest: str, chunk: int) -> None:
    """The server's bulk digest reaches the client; bulk frames flow, in pieces or whole."""
    pair = ConnectionPair(bulk_digests=(bulk_digest,), chunk=chunk, max_frame=4 * CHUNK)
    pair.open()
    assert pair.client.bulk_digest == pair.server.bulk_digest == bulk_digest
    blob = bytes(range(256)) * (CHUNK // 256 + 3)
    data = bulk_frame(pair, b"envelope", blob) + pair.client.send(b"small")
    assert pair.deliver(Role.CLIENT, data) == [Frame(b"envelope" + blob), Frame(b"small")]
    assert pair.send(Role.SERVER, b"back") == [Frame(b"back")]


def test_bulk_frame_layout() -> None:
    """A bulk frame's tag covers header, envelope and the blob's digest, not the blob."""
    pair = open_pair(bulk_digests=("sha256",))
    blob = b"b" * BULK
    frame = bulk_frame(pair, b"env", blob)
    assert HEADER.unpack_from(frame) == (3 + BULK, 0, BULK)
    assert frame[FRAME_HEAD:-TAG_SIZE] == b"env" + blob
    session_tag = pair.client._send_tagger.copy()
    session_tag.update(frame[:FRAME_HEAD] + b"env" + hashlib.sha256(blob).digest())
    assert frame[-TAG_SIZE:] == session_tag.digest()


@pytest.mark.parametrize("index", [0, 13, FRAME_HEAD + 1, FRAME_HEAD + 3 + BULK // 2, -1])
def test_tampered_bulk_frame_raises(index: int) -> None:
    """Flipping a bit in a bulk frame's header, envelope, blob or tag never yields a Frame."""
    pair = open_pair()
    frame = bulk_frame(pair, b"env", b"b" * BULK)
    assert_refused(pair, flip(frame, index % len(frame)))


def test_blob_longer_than_its_frame_raises() -> None:
    """A header claiming a blob longer than the frame is the peer's fault."""
    pair = open_pair()
    pair.server.receive_data(HEADER.pack(10, 0, 11))
    with pytest.raises(RemoteProtocolError, match="blob"):
        pair.server.next_event()


def test_truncated_bulk_frame_then_eof_raises() -> None:
    """A bulk frame cut short by end of file raises, never a Frame."""
    pair = open_pair()
    frame = bulk_frame(pair, b"env", b"b" * BULK)
    assert pair.deliver(Role.CLIENT, frame[: FRAME_HEAD + 100]) == []
    with pytest.raises(RemoteProtocolError, match="truncated"):
        pair.close(Role.CLIENT)


def test_a_verified_blob_is_forwarded_without_hashing_it_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loader forwards a blob it verified: the second frame reuses the digest."""
    inbound, outbound = open_pair(), open_pair()
    blob = b"v" * (2 * BULK)
    payloads = inbound.server.read_frames(bulk_frame(inbound, b"env", blob))
    received = memoryview(payloads[0])[3:]
    assert received == blob

    def no_hashing(algorithm: str, size: int) -> object:
        raise AssertionError("the blob was hashed again")

    with monkeypatch.context() as patch:
        patch.setattr(clustorage.protocol, "sending_hasher", no_hashing)
        forwarded = b"".join(bytes(p) for p in outbound.server.send_bulk(b"env", received))
    assert outbound.client.read_frames(forwarded) == [b"env" + blob]


def test_head_of_bulk_frame_then_small_frame() -> None:
    """read_frames keeps a partial bulk frame and returns it once whole, in order."""
    pair = open_pair()
    frame = bulk_frame(pair, b"e", b"z" * BULK) + pair.client.send(b"tail")
    assert pair.server.read_frames(frame[:1000]) == []
    assert pair.server.read_frames(frame[1000:]) == [b"e" + b"z" * BULK, b"tail"]


def test_read_frames_skips_heartbeats_and_keeps_order() -> None:
    """read_frames gives the payloads of complete frames, in order, and keeps partial ones."""
    pair = open_pair()
    data = pair.client.send(b"one") + pair.client.heartbeat() + pair.client.send(b"two")
    assert pair.server.read_frames(data[:-2]) == [b"one"]
    assert pair.server.read_frames(data[-2:]) == [b"two"]


def test_read_frames_raises_on_a_forged_frame() -> None:
    """read_frames authenticates like next_event and leaves the connection in error."""
    pair = open_pair()
    frame = bytearray(pair.client.send(b"payload"))
    frame[-1] ^= 1
    with pytest.raises(RemoteProtocolError):
        pair.server.read_frames(bytes(frame))
    assert pair.server.state is State.ERROR


def test_bulk_digests_by_speed_ranks_every_known_algorithm() -> None:
    assert sorted(bulk_digests_by_speed()) == sorted(BULK_DIGESTS)


NEEDS_BLAKE3 = pytest.mark.skipif(
    "blake3" not in BULK_DIGESTS, reason="the blake3 package is not installed"
)


@pytest.mark.parametrize(
    ("server", "client", "chosen"),
    [
        pytest.param(
            ("blake3", "sha256", "blake2b"), ("blake2b", "sha256"), "sha256", marks=NEEDS_BLAKE3
        ),
        (("sha256", "blake2b"), ("blake2b", "sha256"), "sha256"),
        (("sha256",), ("blake2b",), "blake2b"),
    ],
)
def test_server_picks_its_first_digest_that_the_client_offers(
    server: tuple[str, ...], client: tuple[str, ...], chosen: str
) -> None:
    """A client without BLAKE3 (none installed where it runs) still gets bulk frames through:
    the server falls back to the fastest digest both have, or to the baseline."""
    pair = open_pair(bulk_digests=server, client_digests=client, max_frame=4 * CHUNK)
    assert pair.server.bulk_digest == pair.client.bulk_digest == chosen
    blob = b"x" * (2 * BULK)
    assert pair.deliver(Role.CLIENT, bulk_frame(pair, b"env", blob)) == [Frame(b"env" + blob)]


def test_a_client_that_offers_no_digests_gets_the_baseline() -> None:
    """A client whose meta names no bulk digests is given the one every node has."""
    pair = ConnectionPair(bulk_digests=("sha256", BASELINE_DIGEST))
    pair.start()
    del pair.server.peer_meta["bulk_digests"]
    pair.server.accept(SERVER_META)
    assert pair.server.bulk_digest == BASELINE_DIGEST


def test_client_refuses_a_digest_it_did_not_offer() -> None:
    """A server that picks a digest the client lacks is a protocol error, named."""
    pair = ConnectionPair(client_digests=("sha256",))
    pair.start()
    pair.server._bulk_digests = ("blake2b",)
    pair.server.peer_meta["bulk_digests"] = ["blake2b"]
    pair.server.accept(SERVER_META)
    with pytest.raises(RemoteProtocolError, match="unknown bulk digest 'blake2b'"):
        pair.deliver(Role.SERVER, pair.server.data_to_send())


def test_unknown_bulk_digest_is_refused_up_front() -> None:
    with pytest.raises(LocalProtocolError, match="unknown bulk digests"):
        Connection(Role.SERVER, COOKIE, SERVER_META, bulk_digests=("md5",))
    with pytest.raises(LocalProtocolError, match="unknown bulk digests"):
        Connection(Role.SERVER, COOKIE, SERVER_META, bulk_digests=())


def test_bulk_digests_may_come_from_any_iterable() -> None:
    """Validating the digests does not use up a generator before they are kept."""
    offered = (name for name in ("sha256",))
    client = Connection(Role.CLIENT, COOKIE, CLIENT_META, bulk_digests=offered)
    assert client._bulk_digests == ("sha256",)


def test_bulk_frame_with_a_big_envelope_raises() -> None:
    """Only the blob of a bulk frame may be big: a header claiming more is refused at once."""
    pair = open_pair()
    pair.server.receive_data(HEADER.pack(2 * BULK + 1, 0, BULK))
    with pytest.raises(RemoteProtocolError, match="malformed"):
        pair.server.next_event()


def test_the_digest_cache_does_not_keep_blobs_alive() -> None:
    """Once nothing else holds a verified blob's buffer, the cache lets it go."""
    inbound = open_pair()
    (payload,) = inbound.server.read_frames(bulk_frame(inbound, b"env", b"v" * BULK))
    owner = weakref.ref(memoryview(payload).obj)
    del payload
    gc.collect()
    assert owner() is None


def test_read_frames_byte_by_byte_matches_whole() -> None:
    """Frames read one byte at a time give the same payloads as read whole."""
    pair = open_pair()
    data = b"".join(pair.client.send(bytes([n]) * n) for n in range(1, 6))
    payloads = [p for i in range(len(data)) for p in pair.server.read_frames(data[i : i + 1])]
    assert payloads == [bytes([n]) * n for n in range(1, 6)]


def test_read_frames_small_frame_then_head_of_bulk_frame() -> None:
    """A read that holds a whole small frame and the start of a bulk one gives the small
    one now and the bulk one once it is whole."""
    pair = open_pair()
    small = pair.client.send(b"first")
    data = small + bulk_frame(pair, b"e", b"z" * BULK)
    assert pair.server.read_frames(data[: len(small) + 200]) == [b"first"]
    assert pair.server.read_frames(data[len(small) + 200 :]) == [b"e" + b"z" * BULK]


@pytest.mark.parametrize("order", [(0, 0), (1, 0)])
def test_read_frames_refuses_replayed_and_reordered_frames(order: tuple[int, int]) -> None:
    """Whole frames read in place are checked for their sequence like any other."""
    pair = open_pair()
    frames = [pair.client.send(b"a"), pair.client.send(b"b")]
    with pytest.raises(RemoteProtocolError, match="sequence"):
        pair.server.read_frames(frames[order[0]] + frames[order[1]])
    assert pair.server.state is State.ERROR


def test_a_gathered_blob_goes_out_as_if_joined() -> None:
    """A payload in several buffers makes the same frame as the joined payload."""
    parts = (b"head", b"x" * BULK, b"y" * (CHUNK + 7), b"tail")
    one, two = open_pair(max_frame=4 * CHUNK), open_pair(max_frame=4 * CHUNK)
    two.client._send_tagger = one.client._send_tagger  # the same session key: the same bytes
    gathered = b"".join(bytes(p) for p in one.client.send_bulk(b"env", Gathered(parts)))
    joined = b"".join(bytes(p) for p in two.client.send_bulk(b"env", b"".join(parts)))
    assert gathered == joined
    assert one.server.read_frames(gathered) == [b"env" + b"".join(parts)]


def test_a_bulk_header_alone_does_not_make_the_server_hold_its_size() -> None:
    """The loader maps a big frame's pages as its bytes come: a header promising 256 MiB
    costs it nothing until they do."""
    size = 256 << 20
    pair = open_pair(max_frame=size)
    before = psutil.Process().memory_info().rss
    assert pair.server.read_frames(HEADER.pack(size, 0, size - 100) + b"e") == []
    assert psutil.Process().memory_info().rss - before < 64 << 20


def child_exit_code(pid: int, hung: str) -> int:
    """The exit code of forked child ``pid``; killed, and ``hung`` raised, after 20 s."""
    deadline = time.monotonic() + 20
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError(hung)
    return os.waitstatus_to_exitcode(done[1])


@pytest.mark.timeout(30)
def test_a_forked_child_hashes_big_frames_too() -> None:
    """A child forked after a big frame went through takes big frames too."""
    parent = open_pair()
    assert parent.server.read_frames(bulk_frame(parent, b"e", b"z" * BULK)) == [b"e" + b"z" * BULK]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            child = open_pair()
            frame = bulk_frame(child, b"e", b"z" * BULK)
            code = 0 if child.server.read_frames(frame) == [b"e" + b"z" * BULK] else 1
        finally:
            os._exit(code)
    assert child_exit_code(pid, "the forked child hung hashing a big frame") == 0


# -- big blobs hashed on a thread of their own -----------------------------------------------


def hashing_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "clustorage-hash" and t.is_alive()]


def wait_for_no_hashing_thread(seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while hashing_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not hashing_threads(), "a hashing thread outlived its frame"


@pytest.fixture
def thread_hashed(monkeypatch: pytest.MonkeyPatch) -> int:
    """Blobs of BULK bytes and more are hashed on a thread (big blobs, at test sizes)."""
    monkeypatch.setattr(clustorage.bulk, "THREAD_HASH_AT", BULK)
    wait_for_no_hashing_thread()
    return BULK


@pytest.mark.timeout(30)
@pytest.mark.parametrize("chunk", [0, 4099])
def test_a_big_blob_is_hashed_on_its_own_thread(thread_hashed: int, chunk: int) -> None:
    """A big blob is verified by a thread that runs while it arrives and ends with it."""
    pair = ConnectionPair(chunk=chunk, max_frame=4 * CHUNK)
    pair.open()
    blob = bytes(range(256)) * (CHUNK // 256 + 3)
    frame = bulk_frame(pair, b"envelope", blob)
    half = len(frame) // 2
    assert pair.server.read_frames(frame[:half]) == []
    assert len(hashing_threads()) == 1
    assert pair.server.read_frames(frame[half:]) == [b"envelope" + blob]
    assert not hashing_threads()


@pytest.mark.timeout(30)
def test_a_big_blob_is_hashed_on_a_thread_while_it_is_sent(thread_hashed: int) -> None:
    """The sender hashes a big blob on a thread beside the one sending it; the thread ends
    with the frame, or when the frame is given up halfway."""
    pair = open_pair()
    blob = b"s" * (4 * BULK)
    parts = pair.client.send_bulk(b"env", blob)
    head = [bytes(next(parts)) for _ in range(2)]
    assert len(hashing_threads()) == 1
    frame = b"".join(head) + b"".join(bytes(part) for part in parts)
    assert not hashing_threads()
    assert pair.server.read_frames(frame) == [b"env" + blob]
    wait_for_no_hashing_thread()
    given_up = open_pair().client.send_bulk(b"env", blob)
    next(given_up), next(given_up)
    given_up.close()
    wait_for_no_hashing_thread()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("index", [FRAME_HEAD + 3, FRAME_HEAD + 3 + BULK // 2, -1])
def test_a_tampered_big_blob_raises(thread_hashed: int, index: int) -> None:
    """A blob hashed on a thread is checked as strictly as one hashed inline."""
    pair = open_pair()
    frame = bulk_frame(pair, b"env", b"b" * (2 * BULK))
    assert_refused(pair, flip(frame, index % len(frame)))
    wait_for_no_hashing_thread()


def halfway_through_a_big_frame(fill: bytes) -> ConnectionPair:
    """A pair whose server has half of a big frame in, its hashing thread running."""
    pair = open_pair()
    frame = bulk_frame(pair, b"env", fill * (4 * BULK))
    assert pair.server.read_frames(frame[: len(frame) // 2]) == []
    assert len(hashing_threads()) == 1
    return pair


@pytest.mark.timeout(30)
def test_the_hashing_thread_of_a_dropped_frame_ends(thread_hashed: int) -> None:
    """A connection dropped halfway through a big frame leaves no thread (nor memory) behind."""
    pair = halfway_through_a_big_frame(b"b")
    del pair
    gc.collect()
    wait_for_no_hashing_thread()


@pytest.mark.timeout(30)
def test_at_most_two_hashing_threads_and_the_rest_inline(thread_hashed: int) -> None:
    """Three big frames arriving at once: two are hashed on threads, one inline; all verify."""
    pairs = [open_pair() for _ in range(3)]
    blobs = [bytes([n]) * (2 * BULK) for n in range(3)]
    frames = [bulk_frame(pair, b"env", blob) for pair, blob in zip(pairs, blobs, strict=True)]
    for pair, frame in zip(pairs, frames, strict=True):
        assert pair.server.read_frames(frame[: len(frame) // 2]) == []
    assert len(hashing_threads()) == 2
    for pair, frame, blob in zip(pairs, frames, blobs, strict=True):
        assert pair.server.read_frames(frame[len(frame) // 2 :]) == [b"env" + blob]
    wait_for_no_hashing_thread()


@pytest.mark.timeout(30)
def test_a_copy_taken_halfway_through_a_thread_hashed_frame(thread_hashed: int) -> None:
    """A deep copy of a connection halfway through a big frame finishes it on its own."""
    pair = open_pair()
    blob = b"c" * (3 * BULK)
    frame = bulk_frame(pair, b"env", blob)
    half = len(frame) // 2
    assert pair.server.read_frames(frame[:half]) == []
    clone = copy.deepcopy(pair.server)
    assert clone.read_frames(frame[half:]) == [b"env" + blob]
    assert pair.server.read_frames(frame[half:]) == [b"env" + blob]
    wait_for_no_hashing_thread()


@pytest.mark.timeout(30)
def test_a_big_frame_cut_short_ends_its_thread_while_its_error_is_kept(
    thread_hashed: int,
) -> None:
    """End of file halfway through a big frame: the thread ends at once, though the error
    (and through its traceback the connection) may be kept, as a REPL keeps the last one."""
    kept: list[BaseException] = []
    for _ in range(3):
        pair = halfway_through_a_big_frame(b"t")
        pair.server.receive_data(b"")
        with pytest.raises(RemoteProtocolError, match="truncated") as caught:
            pair.server.next_event()
        kept.append(caught.value)
        wait_for_no_hashing_thread()
    fresh = open_pair()
    assert fresh.server.read_frames(bulk_frame(fresh, b"e", b"f" * (2 * BULK))[:BULK]) == []
    assert len(hashing_threads()) == 1  # no slot lost to the kept ones
    fresh.server.release()
    wait_for_no_hashing_thread()


@pytest.mark.timeout(30)
def test_a_refused_big_frame_leaves_a_connection_that_can_be_copied(thread_hashed: int) -> None:
    """After a forged big frame, the connection holds no frame, no thread, and copies."""
    pair = open_pair()
    frame = bulk_frame(pair, b"env", b"b" * (2 * BULK))
    with pytest.raises(RemoteProtocolError):
        pair.server.read_frames(flip(frame, len(frame) - 1))
    wait_for_no_hashing_thread()
    assert copy.deepcopy(pair.server).state is State.ERROR


@pytest.mark.timeout(30)
def test_release_ends_the_thread_of_a_frame_still_arriving(thread_hashed: int) -> None:
    """A dropped connection's frame will not finish: release() ends its thread now."""
    pair = halfway_through_a_big_frame(b"r")
    pair.server.release()
    wait_for_no_hashing_thread()


@pytest.mark.timeout(30)
def test_a_child_forked_mid_frame_says_it_cannot_finish_it(thread_hashed: int) -> None:
    """A frame half in when the process forked: the child gets a clear error, never a hang
    nor a claim that the peer forged it; the parent finishes the frame."""
    pair = open_pair()
    blob = b"k" * (4 * BULK)
    frame = bulk_frame(pair, b"env", blob)
    half = len(frame) // 2
    assert pair.server.read_frames(frame[:half]) == []
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            pair.server.read_frames(frame[half:])
        except LocalProtocolError as exc:
            code = 0 if "forked" in str(exc) else 2
        finally:
            os._exit(code)
    assert child_exit_code(pid, "the forked child hung on a frame its parent was receiving") == 0
    assert pair.server.read_frames(frame[half:]) == [b"env" + blob]


class _Owner:
    """A buffer owner that only a garbage collection frees (it is in a reference cycle)."""

    def __init__(self) -> None:
        self.me = self


@pytest.mark.timeout(10, method="thread")  # a deadlock ignores the signal's exception
def test_the_digest_cache_survives_a_collection_inside_it() -> None:
    """A verified buffer freed by a garbage collection that runs while the cache is being
    written to (any allocation can start one) must not deadlock it."""
    digests = VerifiedDigests()
    threshold = gc.get_threshold()
    gc.collect()
    try:
        for every in (1, 2, 3, 5, 7, 11):  # collections at different allocations
            gc.set_threshold(every)
            for _ in range(500):
                freed = _Owner()
                digests.remember(freed, 1, "sha256", b"d")
                del freed  # garbage, until a collection that may start inside remember
    finally:
        gc.set_threshold(*threshold)
    owner = _Owner()
    digests.remember(owner, 3, "sha256", b"digest")
    assert digests.find(memoryview(b"abc"), "sha256") is None


def test_a_verified_blob_written_and_mapped_back_keeps_its_digest() -> None:
    """The loader keeps a durable blob as its file, mapped: the digest it verified on
    arrival carries over, so forwarding the mapping hashes nothing; a blob that was never
    verified carries nothing."""
    digests = VerifiedDigests()
    arrived, mapped = mmap.mmap(-1, 100), mmap.mmap(-1, 100)
    digests.remember(arrived, 100, "sha256", b"digest")
    digests.carry(memoryview(arrived), memoryview(mapped))
    assert digests.find(memoryview(mapped), "sha256") == b"digest"
    unverified, elsewhere = mmap.mmap(-1, 100), mmap.mmap(-1, 100)
    digests.carry(memoryview(unverified), memoryview(elsewhere))
    assert digests.find(memoryview(elsewhere), "sha256") is None


def test_a_receive_buffer_is_used_again_once_nothing_refers_to_it() -> None:
    """A kept buffer is handed out again only when free, of the same size, most recent kept."""
    buffers = RecycledBuffers(count=2)
    first = mmap.mmap(-1, 4096)
    buffers.keep(first)
    view = memoryview(first)
    kept = weakref.ref(first)
    del first
    assert buffers.take(4096) is None  # a view of it lives
    view.release()
    del view
    assert buffers.take(4096 + 1) is None
    assert buffers.take(4096) is kept()
    for _ in range(2):
        buffers.keep(mmap.mmap(-1, 8192))
    gc.collect()
    assert kept() is None  # pushed out by two newer ones: unmapped
    small = RecycledBuffers(count=2, limit=8192)
    too_big = mmap.mmap(-1, 8193)
    small.keep(too_big)
    dropped = weakref.ref(too_big)
    del too_big
    assert dropped() is None  # over the limit on its own: never kept


def test_a_receive_buffer_free_for_a_while_is_let_go() -> None:
    """A kept buffer free at two sweeps the idle time apart is unmapped; one in use, or free
    only since the last sweep, stays."""
    buffers = RecycledBuffers(count=2)
    used, free = mmap.mmap(-1, 4096), mmap.mmap(-1, 8192)
    buffers.keep(used)
    buffers.keep(free)
    view = memoryview(used)
    kept, gone = weakref.ref(used), weakref.ref(free)
    del used, free
    buffers.sweep(100.0, idle=10.0)
    buffers.sweep(105.0, idle=10.0)
    assert buffers.take(8192) is gone()  # free for 5 s only: still there
    buffers.sweep(106.0, idle=10.0)  # taken meanwhile: free again from now on
    buffers.sweep(116.0, idle=10.0)
    gc.collect()
    assert gone() is None and kept() is not None  # a view of the other one lives
    view.release()
    del view
    buffers.sweep(117.0, idle=10.0)
    buffers.sweep(127.0, idle=10.0)
    gc.collect()
    assert kept() is None


@pytest.mark.timeout(30)
def test_a_big_frame_arrives_into_the_buffer_of_one_that_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The next big frame of the same size reuses a buffer nobody uses, never a value's."""
    monkeypatch.setattr(clustorage.bulk, "RECYCLE_AT", BULK)
    monkeypatch.setattr(clustorage.bulk, "RECYCLED", RecycledBuffers())
    pair = open_pair()
    blobs = [bytes([n]) * (2 * BULK) for n in range(3)]
    (held,) = pair.server.read_frames(bulk_frame(pair, b"env", blobs[0]))
    (second,) = pair.server.read_frames(bulk_frame(pair, b"env", blobs[1]))
    assert isinstance(held, memoryview) and isinstance(second, memoryview)
    assert second.obj is not held.obj and held == b"env" + blobs[0]
    buffer = weakref.ref(second.obj)
    second.release()
    del second
    (third,) = pair.server.read_frames(bulk_frame(pair, b"env", blobs[2]))
    assert isinstance(third, memoryview) and third.obj is buffer()
    assert third == b"env" + blobs[2] and held == b"env" + blobs[0]


def received_in_reads(conn: Connection, data: bytes, sizes: list[int]) -> list[bytes | memoryview]:
    """The frames ``conn`` reads from ``data`` as a member reads its socket: straight into
    the arriving frame's buffer where it offers one (at most ``sizes`` bytes per read, in
    turn), else through ``read_frames``."""
    frames: list[bytes | memoryview] = []
    at, turn = 0, 0
    while at < len(data):
        size = sizes[turn % len(sizes)]
        turn += 1
        space = conn.receive_buffer()
        if space is None:
            frames += conn.read_frames(data[at : at + size])
            at += min(size, len(data) - at)
            continue
        size = min(size, len(space), len(data) - at)
        space[:size] = data[at : at + size]
        at += size
        ended = conn.received_into(size)
        assert ended is None  # not inside TLS: a tag follows
    return frames


BIG_VALUE = bytes(range(256)) * (codec.COPY_AT // 256 + 1)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sizes", [[0], [65536], [5, 3, 1 << 20], [70_000, 2]])
def test_a_members_big_bytes_value_lands_in_a_bytes_object_of_its_own(
    monkeypatch: pytest.MonkeyPatch, sizes: list[int]
) -> None:
    """A big bytes value that a member receives goes straight into a bytes object, whether
    it comes in one piece or many (``sizes``: bytes per read; 0: the whole frame through
    read_frames): the receive buffer's tail holds zeros where the value would be, and every
    load of the payload gives that same object, which is not copied again; its buffer is
    not kept for a later frame."""
    monkeypatch.setattr(clustorage.bulk, "RECYCLE_AT", BULK)
    monkeypatch.setattr(clustorage.bulk, "RECYCLED", RecycledBuffers())
    payload = bytes(codec.dump_borrowing("k", BIG_VALUE))
    pair = open_pair(max_frame=4 * len(payload))
    data = bulk_frame(pair, b"env", payload, Role.SERVER)
    if sizes == [0]:
        (frame,) = pair.client.read_frames(data)
    else:
        (frame,) = received_in_reads(pair.client, data, sizes)
    assert isinstance(frame, memoryview) and frame[:3] == b"env"
    blob = frame[3:]
    value = clustorage.bulk.landed(blob)
    assert type(value) is bytes and value == BIG_VALUE
    assert bytes(blob[64:-64]) == bytes(len(blob) - 128)  # never written: never mapped in
    assert codec.load(blob) is value and codec.load(blob) is value
    assert clustorage.bulk.landed(blob[:-1]) is None  # only the blob it was
    buffer = weakref.ref(frame.obj)
    del frame, blob
    gc.collect()
    (again,) = pair.client.read_frames(bulk_frame(pair, b"env", payload, Role.SERVER))
    assert isinstance(again, memoryview) and again.obj is not buffer()
    assert codec.load(again[3:]) == BIG_VALUE


@pytest.mark.timeout(30)
def test_a_value_landing_in_a_used_buffer_leaves_neither_its_bytes_nor_its_digest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A value that lands in a receive buffer used before: the buffer's value region reads
    as zeros, not as the frame before's bytes, and no digest is known for it (forwarding it
    would hash what it holds); the buffer is not kept for another frame."""
    monkeypatch.setattr(clustorage.bulk, "RECYCLE_AT", BULK)
    monkeypatch.setattr(clustorage.bulk, "RECYCLED", RecycledBuffers())
    payload = bytes(codec.dump_borrowing("k", BIG_VALUE))
    pair = open_pair(max_frame=4 * len(payload))
    (first,) = pair.client.read_frames(bulk_frame(pair, b"env", b"Z" * len(payload), Role.SERVER))
    assert isinstance(first, memoryview) and clustorage.bulk.landed(first[3:]) is None
    buffer = weakref.ref(first.obj)
    del first
    gc.collect()
    (frame,) = pair.client.read_frames(bulk_frame(pair, b"env", payload, Role.SERVER))
    assert isinstance(frame, memoryview) and frame.obj is buffer()
    blob = frame[3:]
    assert clustorage.bulk.landed(blob) == BIG_VALUE
    assert bytes(blob[7:-2]) == bytes(len(blob) - 9)
    assert clustorage.bulk.VERIFIED.find(blob, pair.client.bulk_digest) is None
    del frame, blob
    gc.collect()
    (again,) = pair.client.read_frames(bulk_frame(pair, b"env", b"Y" * len(payload), Role.SERVER))
    assert isinstance(again, memoryview) and again.obj is not buffer()


@pytest.mark.timeout(30)
def test_a_landing_frame_pushes_no_kept_buffer_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Buffers kept for later frames stay kept when a value lands: it needs none."""
    monkeypatch.setattr(clustorage.bulk, "RECYCLE_AT", BULK)
    monkeypatch.setattr(clustorage.bulk, "RECYCLED", RecycledBuffers(count=2))
    payload = bytes(codec.dump_borrowing("k", BIG_VALUE))
    pair = open_pair(max_frame=4 * len(payload))
    sizes = (2 * BULK, 3 * BULK)
    kept = []
    for size in sizes:
        (frame,) = pair.client.read_frames(bulk_frame(pair, b"env", b"Z" * size, Role.SERVER))
        assert isinstance(frame, memoryview)
        kept.append(weakref.ref(frame.obj))
        del frame
    (landing,) = pair.client.read_frames(bulk_frame(pair, b"env", payload, Role.SERVER))
    assert isinstance(landing, memoryview) and clustorage.bulk.landed(landing[3:]) == BIG_VALUE
    gc.collect()
    for size, buffer in zip(sizes, kept, strict=True):
        (frame,) = pair.client.read_frames(bulk_frame(pair, b"env", b"Y" * size, Role.SERVER))
        assert isinstance(frame, memoryview) and frame.obj is buffer()
        del frame


@pytest.mark.timeout(30)
def test_only_a_members_big_bytes_value_lands() -> None:
    """The loader's frames never land (it does not make a value's memory from a member's
    header alone); nor does a member's blob that is not one pickled bytes, or one whose
    head says so and its tail does not (then it is copied back: the payload is whole)."""
    payload = bytes(codec.dump_borrowing("k", BIG_VALUE))
    pair = open_pair(max_frame=4 * len(payload))
    (received,) = pair.server.read_frames(bulk_frame(pair, b"env", payload))
    assert isinstance(received, memoryview) and received[3:] == payload
    assert clustorage.bulk.landed(received[3:]) is None
    assert codec.load(received[3:]) == BIG_VALUE

    values = [[BIG_VALUE], bytearray(BIG_VALUE)]
    for other in values:
        other_payload = bytes(codec.dump("k", other))
        (frame,) = pair.client.read_frames(bulk_frame(pair, b"env", other_payload, Role.SERVER))
        assert isinstance(frame, memoryview) and frame[3:] == other_payload
        assert clustorage.bulk.landed(frame[3:]) is None and codec.load(frame[3:]) == other

    lookalike = payload[:-2] + b"xy"  # the head of a pickled bytes, another tail
    (frame,) = pair.client.read_frames(bulk_frame(pair, b"env", lookalike, Role.SERVER))
    assert isinstance(frame, memoryview) and frame[3:] == lookalike
    assert clustorage.bulk.landed(frame[3:]) is None


@pytest.mark.timeout(30)
def test_a_frame_cloned_while_its_value_lands_is_whole() -> None:
    """A connection copied in the middle of a landing frame (``copy.deepcopy``) goes on
    with a buffer of its own holding every byte that came so far."""
    payload = bytes(codec.dump_borrowing("k", BIG_VALUE))
    pair = open_pair(max_frame=4 * len(payload))
    data = bulk_frame(pair, b"env", payload, Role.SERVER)
    half = len(data) // 2
    assert received_in_reads(pair.client, data[:half], [1 << 20]) == []
    clone = copy.deepcopy(pair.client)
    (frame,) = received_in_reads(pair.client, data[half:], [1 << 20])
    (cloned,) = received_in_reads(clone, data[half:], [1 << 20])
    assert isinstance(frame, memoryview) and isinstance(cloned, memoryview)
    assert clustorage.bulk.landed(frame[3:]) == BIG_VALUE
    assert cloned[3:] == payload and codec.load(cloned[3:]) == BIG_VALUE
