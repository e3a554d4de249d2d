"""The loader's network side: connections around the sans-I/O protocol and LoaderCore.

Each TCP connection is one :class:`ServerConnection` (a protocol of a
:class:`~clustorage.reactor.Stream`); ``buffer_updated`` feeds the protocol object and hands
decoded messages to the core. A peer that breaks the protocol, does not know
the cookie, stays silent through the handshake or stops reading costs one closed connection
and one log line with its address.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator
from typing import Any

from . import messages
from .errors import AuthenticationError, ProtocolError
from .hello import Timing, handshake_meta, incompatibility
from .liveness import watch
from .loader import LoaderCore
from .protocol import (
    BULK,
    Closed,
    Connection,
    Frame,
    Hello,
    Role,
    State,
    bulk_digests_by_speed,
    frame_size,
)
from .reactor import Stream

__all__ = ["ServerConnection"]

log = logging.getLogger(__name__)

# Every connection reads into this one buffer: the loop runs one callback at a time, and
# the protocol object copies what it needs before the next read.
_READ_BUFFER = memoryview(bytearray(1 << 20))


class ServerConnection:
    """One member's connection to the loader."""

    def __init__(
        self, core: LoaderCore, cookie: bytes, timing: Timing, max_frame: int, registry: set[Any]
    ) -> None:
        self._core = core
        self._timing = timing
        self._registry = registry
        self._conn = Connection(
            Role.SERVER,
            cookie,
            handshake_meta(core.name, role="loader"),
            max_frame=max_frame,
            bulk_digests=bulk_digests_by_speed(),
        )
        self._transport: Stream | None = None
        # Frames waiting to go out, part by part, each with whether it counts in _queued.
        self._outbox: collections.deque[tuple[Iterator[bytes | memoryview], bool]] = (
            collections.deque()
        )
        self._queued = 0  # bytes in the outbox that count against the write limit
        self._into_bulk = False
        self._joined = False
        self._paused = False
        self.name = "?"
        self.session = ""
        self.address = "?"
        self.connected_since = time.time()
        self.last_heard = time.monotonic()
        self.last_sent = time.monotonic()

    def __repr__(self) -> str:
        return f"<ServerConnection {self.name} from {self.address}>"

    # -- stream callbacks -------------------------------------------------------------------

    def connection_made(self, transport: Stream) -> None:
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self.address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        transport.set_write_buffer_limits(high=4 << 20)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            watch(sock, self._timing.dead_after)
        self._registry.add(self)
        self._write(self._conn.data_to_send())

    def get_buffer(self, sizehint: int) -> memoryview:
        space = self._conn.receive_buffer() if self._conn.state is State.OPEN else None
        self._into_bulk = space is not None
        return _READ_BUFFER if space is None else space

    def buffer_updated(self, nbytes: int) -> None:
        self.last_heard = time.monotonic()
        if self._into_bulk:  # the bytes went straight into a big payload
            self._conn.received_into(nbytes)
            return
        if self._conn.state is not State.OPEN:
            self._conn.receive_data(_READ_BUFFER[:nbytes])
            self._pump()
            return
        try:
            payloads = self._conn.read_frames(_READ_BUFFER[:nbytes])
            handle = self._core.handle
            for payload in payloads:
                handle(self, messages.decode(payload))
                if self._transport is None or self._transport.is_closing():
                    return
        except ProtocolError as exc:
            log.warning("closed %s (%s): %s", self.address, self.name, exc)
            self.close(flush=True)

    def eof_received(self) -> bool | None:
        self._conn.receive_data(b"")
        self._pump()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn.release()
        self._outbox.clear()
        self._queued = 0
        self._registry.discard(self)
        if self._joined:
            self._joined = False
            self._core.leave(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._flush()

    # -- protocol --------------------------------------------------------------------------

    def _pump(self) -> None:
        try:
            while (event := self._conn.next_event()) is not None:
                if isinstance(event, Frame):
                    if event.payload:
                        self._core.handle(self, messages.decode(event.payload))
                elif isinstance(event, Hello):
                    self._hello(dict(event.meta))
                elif isinstance(event, Closed):
                    self.close()
                    return
                if self._transport is None or self._transport.is_closing():
                    return
        except AuthenticationError:
            log.warning("refused %s: wrong cookie", self.address)
            self.close(flush=True)
        except ProtocolError as exc:
            log.warning("closed %s (%s): %s", self.address, self.name, exc)
            self.close(flush=True)

    def _hello(self, meta: dict[str, Any]) -> None:
        name = str(meta.get("name", ""))
        self.session = str(meta.get("session", ""))
        expected = meta.get("expect")
        ours = handshake_meta(self._core.name)
        problem = incompatibility(ours, meta)
        if expected and expected != self._core.name:
            problem = (
                f"the loader at {self._core.address} is named {self._core.name!r}, not {expected!r}"
            )
            self._conn.refuse(problem, kind="wrong_loader", loader=self._core.name)
        elif problem:
            self._conn.refuse(problem, kind="incompatible")
        elif (clash := self._core.clash(name)) is not None and not self._replaces(clash):
            problem = (
                f"a node named {name!r} is already connected to {self._core.name} "
                f"(from {clash.address}); choose another name"
            )
            self._conn.refuse(problem, kind="name_clash")
        if problem:
            log.warning("refused %s from %s: %s", name, self.address, problem)
            self.close(flush=True)
            return
        self.name = name
        self._conn.accept(
            handshake_meta(self._core.name, role="loader", store=self._core.store_identity)
        )
        self._write(self._conn.data_to_send())
        self._joined = True
        self._core.join(self)

    def _replaces(self, clash: Any) -> bool:
        """A node reconnecting before its old connection timed out replaces it."""
        if isinstance(clash, ServerConnection) and clash.session and clash.session == self.session:
            log.info(
                "%s reconnected from %s; dropping its old connection", clash.name, self.address
            )
            clash.close()
            return True
        return False

    # -- output ----------------------------------------------------------------------------

    def _write(self, data: bytes | memoryview) -> None:
        if data and self._transport is not None and not self._transport.is_closing():
            if self._outbox:  # behind a big frame that is still going out
                self._outbox.append((iter((data,)), True))
                self._queued += len(data)
                return
            self._transport.write(data)
            self.last_sent = time.monotonic()

    def _queue(self, envelope: bytes, blob: messages.Payload, counted: bool) -> None:
        """Send a frame once what is queued before it has gone, part by part as the member
        drains it: it is made, numbered (and hashed, when it must be) only then. ``counted``:
        whether its bytes count against the write limit."""
        self._outbox.append((self._frame_parts(envelope, blob), counted))
        if counted:
            self._queued += frame_size(len(envelope) + len(blob))
        self._flush()

    def _frame_parts(self, envelope: bytes, blob: messages.Payload) -> Iterator[bytes | memoryview]:
        yield from self._conn.send_message(envelope, blob)

    def _flush(self) -> None:
        outbox, transport = self._outbox, self._transport
        while outbox and not self._paused and transport is not None:
            if transport.is_closing():
                outbox.clear()
                self._queued = 0
                return
            parts, counted = outbox[0]
            try:
                part = next(parts, None)
            except ProtocolError as exc:  # a frame half made: the stream cannot go on
                log.error("closed %s (%s): cannot send a frame: %s", self.address, self.name, exc)
                self.close()
                return
            if part is None:
                outbox.popleft()
            elif part:
                if counted:
                    self._queued -= len(part)
                transport.write(part)  # may call pause_writing, which ends the loop
                self.last_sent = time.monotonic()

    def deliver(
        self, message: messages.Message, parts: tuple[bytes, messages.Payload] | None = None
    ) -> None:
        """Queue ``message`` (``parts``: it, already encoded) for this member; drop the member
        if it stopped reading."""
        if not self._joined or self._transport is None or self._transport.is_closing():
            return
        # A resync's entries do not count: each is one the loader holds, sent once per
        # connection, made only as the member drains what went before.
        counted = type(message) is not messages.SyncEntry
        backlog = self._transport.get_write_buffer_size() + self._queued
        if counted and backlog > self._timing.write_limit:
            log.warning("closed %s (%s): it stopped reading", self.address, self.name)
            self.close()
            return
        envelope, blob = messages.encode_parts(message) if parts is None else parts
        self._conn.check_length(len(envelope) + len(blob))  # refused here, not when queued
        if self._outbox or not counted or len(blob) >= BULK:
            self._queue(envelope, blob, counted)  # frames are numbered in the order they go
        else:
            self._write(self._conn.send_small(envelope, blob))

    def close(self, *, flush: bool = False) -> None:
        """Close the connection (after sending what the protocol queued, if ``flush``).

        Closing without ``flush`` also ends a flushing close that has not finished.
        """
        if self._transport is None:
            return
        if self._transport.is_closing():
            if not flush:
                self._transport.abort()
            return
        if flush:
            self._write(self._conn.data_to_send())
            self._transport.close()
        else:
            self._transport.abort()
        if self._joined:
            self._joined = False
            self._core.leave(self)

    def tick(self, now: float) -> None:
        """Called every heartbeat: time out handshakes, keep idle connections carrying."""
        timing = self._timing
        if not self._joined:
            if now - self.last_heard > timing.handshake:
                log.warning("closed %s: no handshake within %.1fs", self.address, timing.handshake)
                self.close()
            return
        # Neither "silent" nor "slow to read" for too long: a busy member is not a dead one
        # (SPEC "Busy is not dead"). The kernel tells a dead one (clustorage.liveness); one
        # that stops reading is dropped when its backlog passes the write limit (deliver).
        if now - self.last_sent >= timing.heartbeat and not self._outbox:
            self._write(self._conn.heartbeat())
