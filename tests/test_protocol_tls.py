"""The protocol inside TLS, bytes in and bytes out: a handshake bound to the TLS session's
channel binding, and frames without tags of their own (SPEC "Wire and trust")."""

from __future__ import annotations

import pytest

from clustorage.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from clustorage.protocol import BULK, HEADER, TAG_SIZE, Frame, Role, State
from tests.protocol_helpers import ConnectionPair, drain

pytestmark = pytest.mark.timeout(30)

BINDING = bytes(range(48))  # tls-unique of a TLS 1.3 session: a Finished message
OTHER = bytes(range(1, 49))  # another session's: what a relay's second TLS session has


def bound_pair(
    client: bytes = BINDING, server: bytes = BINDING, **kwargs: object
) -> ConnectionPair:
    """A pair whose ends are bound to ``client`` and ``server`` (b"": not bound)."""
    pair = ConnectionPair(**kwargs)  # type: ignore[arg-type]
    if client:
        pair.client.bind(client)
    if server:
        pair.server.bind(server)
    return pair


def bulk_bytes(pair: ConnectionPair, envelope: bytes, blob: bytes) -> bytes:
    return b"".join(bytes(part) for part in pair.client.send_bulk(envelope, blob))


@pytest.mark.parametrize("chunk", [0, 1, 7])
def test_bound_ends_open_and_frames_carry_no_tag(chunk: int) -> None:
    pair = bound_pair(chunk=chunk)
    pair.open()
    assert not pair.client.tagged and not pair.server.tagged
    frame = pair.client.send(b"payload")
    assert frame == HEADER.pack(7, 0, 0) + b"payload"  # header and payload, nothing after
    assert pair.deliver(Role.CLIENT, frame) == [Frame(b"payload")]
    assert pair.send(Role.SERVER, b"back") == [Frame(b"back")]
    assert pair.deliver(Role.CLIENT, pair.client.heartbeat()) == [Frame(b"")]


@pytest.mark.parametrize(
    ("client", "server"),
    [(BINDING, OTHER), (BINDING, b""), (b"", BINDING)],
    ids=["relayed", "tls-client-only", "tls-server-only"],
)
def test_ends_bound_to_different_sessions_fail_the_handshake(client: bytes, server: bytes) -> None:
    """A relay joining two TLS sessions (or TLS on one side only) cannot pass the handshake,
    even with the right cookie at both ends: the server refuses the client's proof."""
    pair = bound_pair(client, server)
    assert pair.flush(Role.SERVER) == []
    with pytest.raises(AuthenticationError):
        pair.flush(Role.CLIENT)
    assert pair.server.state is State.ERROR
    with pytest.raises(AuthenticationError, match="refused"):  # its refusal, at the client
        pair.deliver(Role.SERVER, pair.server.data_to_send())
    assert pair.client.rejected


@pytest.mark.parametrize("order", ["replayed", "reordered"])
def test_sequence_numbers_still_catch_replay_and_reorder(order: str) -> None:
    """TLS numbers records too; the frames' own numbers stay, and stay checked."""
    pair = bound_pair()
    pair.open()
    first, second = pair.client.send(b"one"), pair.client.send(b"two")
    if order == "replayed":
        assert pair.deliver(Role.CLIENT, first) == [Frame(b"one")]
        pair.server.receive_data(first)
    else:
        pair.server.receive_data(second)
    with pytest.raises(RemoteProtocolError, match="sequence"):
        drain(pair.server)


@pytest.mark.parametrize("chunk", [0, 4099])
def test_bulk_frames_inside_tls_are_neither_hashed_nor_tagged(chunk: int) -> None:
    pair = bound_pair(chunk=chunk, max_frame=1 << 22)
    pair.open()
    blob = bytes(range(256)) * (BULK // 64)
    frame = bulk_bytes(pair, b"env", blob)
    assert frame == HEADER.pack(3 + len(blob), 0, len(blob)) + b"env" + blob
    assert pair.deliver(Role.CLIENT, frame + pair.client.send(b"next")) == [
        Frame(b"env" + blob),
        Frame(b"next"),
    ]


def test_a_blob_received_in_place_is_handed_over_at_its_last_byte() -> None:
    """With no tag to wait for, the frame ends with its blob: received_into returns it."""
    pair = bound_pair(max_frame=1 << 22)
    pair.open()
    blob = b"b" * (4 * BULK)
    frame = bulk_bytes(pair, b"env", blob)
    head = len(HEADER.pack(0, 0, 0)) + 3 + 100
    pair.server.receive_data(frame[:head])
    assert drain(pair.server) == []
    rest = memoryview(frame)[head:]
    while rest:
        space = pair.server.receive_buffer()
        assert space is not None
        size = min(len(space), len(rest), 50_000)
        space[:size] = rest[:size]
        rest = rest[size:]
        payload = pair.server.received_into(size)
        assert (payload is None) == bool(rest)
    assert payload is not None and bytes(payload) == b"env" + blob
    assert pair.send(Role.CLIENT, b"after") == [Frame(b"after")]


def test_a_tagged_connection_still_waits_for_the_tag() -> None:
    """Without TLS, received_into never ends a frame: its tag is still to come."""
    pair = ConnectionPair(max_frame=1 << 22)
    pair.open()
    frame = bulk_bytes(pair, b"env", b"b" * (2 * BULK))
    pair.server.receive_data(frame[:100])
    assert drain(pair.server) == []
    space = pair.server.receive_buffer()
    assert space is not None
    body = frame[100:-TAG_SIZE]
    space[: len(body)] = body
    assert pair.server.received_into(len(body)) is None
    pair.server.receive_data(frame[-TAG_SIZE:])
    assert drain(pair.server) == [Frame(frame[len(HEADER.pack(0, 0, 0)) : -TAG_SIZE])]


def test_binding_once_the_handshake_has_begun_is_refused() -> None:
    pair = ConnectionPair()
    pair.flush(Role.SERVER)  # the client has answered the challenge: its MAC is made
    with pytest.raises(LocalProtocolError, match="before its handshake"):
        pair.client.bind(BINDING)
    with pytest.raises(LocalProtocolError):
        ConnectionPair().client.bind(b"")
