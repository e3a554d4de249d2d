"""A client and a server Connection wired together through bytes (after h11's ConnectionPair)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from clustorage.bulk import Spiller
from clustorage.protocol import BULK_DIGESTS, Connection, Event, Hello, Role, State, Welcome

__all__ = [
    "CLIENT_META",
    "COOKIE",
    "SERVER_META",
    "ConnectionPair",
    "drain",
    "flip",
]

COOKIE = b"unit-test-cookie-0123456789"
CLIENT_META: Mapping[str, Any] = {"name": "app2", "python": "3.11"}
SERVER_META: Mapping[str, Any] = {"name": "app1", "python": "3.11"}


def drain(conn: Connection) -> list[Event]:
    """Every event the bytes received so far complete (exceptions propagate)."""
    events: list[Event] = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    return events


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    """``data`` with the bits of ``mask`` flipped in byte ``index``."""
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]


class ConnectionPair:
    """Two Connections, each one's output fed to the other; every byte sent is recorded.

    ``chunk`` sets how many bytes travel per ``receive_data`` call (1 exercises every
    partial-read path); 0 delivers each write whole. ``spiller``: the server's (a loader
    that writes big blobs to files as they arrive); ``binding``: both run as inside TLS.
    """

    def __init__(
        self,
        cookie: bytes = COOKIE,
        *,
        server_cookie: bytes | None = None,
        client_meta: Mapping[str, Any] = CLIENT_META,
        max_frame: int = 1 << 20,
        chunk: int = 0,
        bulk_digests: Sequence[str] = BULK_DIGESTS,
        client_digests: Sequence[str] = BULK_DIGESTS,
        spiller: Spiller | None = None,
        binding: bytes = b"",
    ) -> None:
        self.server = Connection(
            Role.SERVER,
            server_cookie or cookie,
            SERVER_META,
            max_frame=max_frame,
            bulk_digests=bulk_digests,
            spiller=spiller,
            binding=binding,
        )
        self.client = Connection(
            Role.CLIENT,
            cookie,
            client_meta,
            max_frame=max_frame,
            bulk_digests=client_digests,
            binding=binding,
        )
        self.chunk = chunk
        self.sent: dict[Role, list[bytes]] = {Role.CLIENT: [], Role.SERVER: []}

    def conn(self, role: Role) -> Connection:
        """The Connection playing ``role``."""
        return self.client if role is Role.CLIENT else self.server

    def peer(self, role: Role) -> Connection:
        """The Connection opposite ``role``."""
        return self.server if role is Role.CLIENT else self.client

    def deliver(self, role: Role, data: bytes) -> list[Event]:
        """Record ``data`` as sent by ``role``, feed it to the peer, return the peer's events."""
        self.sent[role].append(data)
        peer = self.peer(role)
        if not self.chunk:
            peer.receive_data(data)
            return drain(peer)
        events: list[Event] = []
        for start in range(0, len(data), self.chunk):
            peer.receive_data(data[start : start + self.chunk])
            events += drain(peer)
        return events

    def flush(self, role: Role) -> list[Event]:
        """Move ``role``'s pending handshake bytes to the peer; the peer's events."""
        data = self.conn(role).data_to_send()
        return self.deliver(role, data) if data else drain(self.peer(role))

    def send(self, role: Role, payload: bytes) -> list[Event]:
        """Send one frame from ``role``; the peer's events."""
        return self.deliver(role, self.conn(role).send(payload))

    def close(self, role: Role) -> list[Event]:
        """``role`` closes its side; the peer's events."""
        peer = self.peer(role)
        peer.receive_data(b"")
        return drain(peer)

    def start(self) -> Hello:
        """Run the handshake up to the server's decision; the server's Hello."""
        assert self.flush(Role.SERVER) == []  # challenge -> client; nothing to report yet
        events = self.flush(Role.CLIENT)  # response -> server
        assert len(events) == 1 and isinstance(events[0], Hello), events
        return events[0]

    def open(self, server_meta: Mapping[str, Any] = SERVER_META) -> tuple[Hello, Welcome]:
        """Run the whole handshake with the server accepting; both sides end OPEN."""
        hello = self.start()
        self.server.accept(server_meta)
        events = self.flush(Role.SERVER)
        assert len(events) == 1 and isinstance(events[0], Welcome), events
        assert self.client.state is State.OPEN and self.server.state is State.OPEN
        return hello, events[0]

    def all_bytes(self) -> bytes:
        """Everything either side has sent so far."""
        return b"".join(self.sent[Role.CLIENT] + self.sent[Role.SERVER])
