"""The loader's network side: connections around the sans-I/O protocol and LoaderCore.

Each TCP connection is one :class:`ServerConnection`, an asyncio buffered protocol (accepted
by a :class:`~clustorage.listener.Listener`); ``buffer_updated`` feeds the protocol object
and hands decoded messages to the core. A peer that breaks the protocol, does not know
the cookie, stays silent through the handshake or stops reading costs one closed connection
and one log line with its address.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import logging
import ssl
import time
from collections.abc import Iterator
from typing import Any, cast

from . import messages, tls
from .bulk import bulk_digests_by_speed
from .config import check_name
from .errors import AuthenticationError, ConfigError, ProtocolError
from .hello import Timing, handshake_meta, incompatibility
from .keys import printable, unencodable
from .listener import Newcomer
from .liveness import ClosedWindow, watch
from .loader import LoaderCore, failure
from .probe import PROBE_ROLE
from .protocol import (
    BULK,
    Closed,
    Connection,
    Frame,
    Hello,
    Role,
    State,
    frame_size,
)
from .stay_awake import StayAwake

__all__ = ["ServerConnection", "release_memory"]

log = logging.getLogger(__name__)


def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to ask
        return None


_MALLOC_TRIM = _malloc_trim()


def release_memory() -> None:
    """Give the memory freed by dropping a backlog back to the system: glibc keeps freed
    heap memory (most of a backlog of frames under 128 KiB) for later unless asked."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# Every connection reads into this one buffer: the loop runs one callback at a time, and
# the protocol object copies what it needs before the next read.
_READ_BUFFER = memoryview(bytearray(1 << 20))


def _invalid_name(name: object) -> str | None:
    """Why a peer's node name is refused (SPEC "Cluster model": the loader checks names
    too), or None."""
    try:
        check_name(name)  # type: ignore[arg-type]  # it checks the type too
    except ConfigError as exc:
        return str(exc)
    return None


class ServerConnection(asyncio.BufferedProtocol):
    """One member's connection to the loader; ``newcomer``: its probation (see listener)."""

    def __init__(
        self,
        core: LoaderCore,
        cookie: bytes,
        timing: Timing,
        max_frame: int,
        registry: set[Any],
        newcomer: Newcomer | None = None,
        awake: StayAwake | None = None,
    ) -> None:
        self._core = core
        self._awake = awake
        self._timing = timing
        self._registry = registry
        self._conn = Connection(
            Role.SERVER,
            cookie,
            handshake_meta(core.name, role="loader"),
            max_frame=max_frame,
            bulk_digests=bulk_digests_by_speed(),
            spiller=core.arriving_blob,
        )
        self._newcomer = newcomer
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._window: ClosedWindow | None = None  # the peer's receive window, watched
        # Frames waiting to go out, part by part, each with whether it counts in _queued.
        self._outbox: collections.deque[tuple[Iterator[bytes | memoryview], bool]] = (
            collections.deque()
        )
        self._queued = 0  # bytes in the outbox that count against the write limit
        self._into_bulk = False
        self._joined = False
        self._handle = core.handle  # a probe's connection answers Status and History only
        self._paused = False
        self.name = "?"
        self.session = ""
        self.address = "?"
        self.connected_since = time.time()
        self.last_heard = time.monotonic()
        self.last_sent = time.monotonic()

    def __repr__(self) -> str:
        return f"<ServerConnection {self.name} from {self.address}>"

    # -- protocol callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)
        self._loop = loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        self.address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        transport.set_write_buffer_limits(high=4 << 20)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            watch(sock, self._timing.dead_after)
            self._window = ClosedWindow(sock, self._timing.dead_after)
        self._registry.add(self)
        # SPEC "Wire and trust": the handshake is done within this, however the bytes trickle,
        # counted from the accept (a TLS handshake came first).
        since = time.monotonic() if self._newcomer is None else self._newcomer.since
        left = self._timing.handshake - (time.monotonic() - since)
        self._deadline = loop.call_later(max(left, 0.0), self._handshake_overdue)
        self._write(self._conn.data_to_send())

    def get_buffer(self, sizehint: int) -> memoryview:
        space = self._conn.receive_buffer() if self._conn.state is State.OPEN else None
        self._into_bulk = space is not None
        return _READ_BUFFER if space is None else space

    def buffer_updated(self, nbytes: int) -> None:
        self.last_heard = time.monotonic()
        if self._conn.state is not State.OPEN:
            if self._conn.state is State.AWAIT_RESPONSE and self._conn.tagged:
                tls_object = self._transport and self._transport.get_extra_info("ssl_object")
                if binding := tls.channel_binding(tls_object):  # see protocol.Connection.bind
                    self._conn.bind(binding)
            self._conn.receive_data(_READ_BUFFER[:nbytes])
            self._pump()
            return
        try:
            if self._into_bulk:  # the bytes went straight into a big payload
                ended = self._conn.received_into(nbytes)  # inside TLS, it may end there
                payloads: list[bytes | memoryview] = [] if ended is None else [ended]
            else:
                payloads = self._conn.read_frames(_READ_BUFFER[:nbytes])
            handle = self._handle
            for payload in payloads:
                message = messages.decode(payload)
                if self._storable(message):
                    handle(self, message)
                if self._transport is None or self._transport.is_closing():
                    return
                if self._awake is not None and getattr(message, "rid", None):  # a request
                    self._awake.requested()
        except ProtocolError as exc:
            log.warning("closed %s (%s): %s", self.address, self.name, exc)
            self.close(flush=True)

    def eof_received(self) -> bool | None:
        self._conn.receive_data(b"")
        self._pump()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, ssl.SSLError) and not isinstance(
            exc, ssl.SSLZeroReturnError | ssl.SSLEOFError
        ):
            log.warning(
                "closed %s: a TLS record failed its check (%s): altered on the way",
                self.address,
                tls.why(exc),
            )
        if self._newcomer is not None:
            self._newcomer.gone()
        if self._deadline is not None:
            self._deadline.cancel()
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
                    if event.payload and self._storable(message := messages.decode(event.payload)):
                        self._handle(self, message)
                elif isinstance(event, Hello):
                    self._hello(dict(event.meta))
                elif isinstance(event, Closed):
                    self.close()
                    return
                if self._transport is None or self._transport.is_closing():
                    return
        except AuthenticationError:
            relayed = "" if self._conn.tagged else " (or, over TLS, a relay in between)"
            log.warning("refused %s: wrong cookie%s", self.address, relayed)
            self.close(flush=True)
        except ProtocolError as exc:
            log.warning("closed %s (%s): %s", self.address, self.name, exc)
            self.close(flush=True)

    def _hello(self, meta: dict[str, Any]) -> None:
        name = meta.get("name", "")
        self.session = str(meta.get("session", ""))
        expected = meta.get("expect")
        ours = handshake_meta(self._core.name)
        problem = incompatibility(ours, meta)
        if (invalid := _invalid_name(name)) is not None:
            problem = invalid
            self._conn.refuse(problem, kind="invalid_name")
        elif expected and expected != self._core.name:
            problem = (
                f"the loader at {self._core.address} is named {self._core.name!r}, not {expected!r}"
            )
            self._conn.refuse(problem, kind="wrong_loader", loader=self._core.name)
        elif meta.get("role") == PROBE_ROLE:
            self._accept_probe(name)
            return
        elif (active := getattr(self._core, "standby_of", None)) is not None:
            problem = f"standby; the active loader is {active or 'not known yet'}"
            self._conn.refuse(problem, kind="standby", active=active)
        elif problem:
            self._conn.refuse(problem, kind="incompatible")
        elif (clash := self._core.clash(name)) is not None and not self._replaces(clash):
            problem = (
                f"a node named {name!r} is already connected to {self._core.name} "
                f"(from {clash.address}); choose another name"
            )
            self._conn.refuse(problem, kind="name_clash")
        if problem:
            log.warning("refused %s from %s: %s", printable(name), self.address, printable(problem))
            self.close(flush=True)
            return
        self.name = name
        self._conn.accept(self._welcome())
        self._write(self._conn.data_to_send())
        self._trusted()
        self._joined = True
        self._core.join(self)

    def _welcome(self) -> dict[str, Any]:
        """What this loader says of itself to a node or probe it accepts."""
        return handshake_meta(
            self._core.name,
            role="loader",
            store=self._core.store_identity,
            not_loaded=True,  # it takes NotLoaded: older loaders drop who sends it
            reclaims=True,  # it takes Reclaim and Await (see clustorage.loader)
        )

    def _trusted(self) -> None:
        """The peer proved it knows the cookie: no handshake deadline, no cap (see listener)."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._newcomer is not None:
            self._newcomer.trust()

    def _handshake_overdue(self) -> None:
        self._deadline = None
        if not self._joined and self._transport is not None:
            log.warning(
                "closed %s: no handshake within %.1fs", self.address, self._timing.handshake
            )
            self.close()

    def _storable(self, message: messages.Message) -> bool:
        """Refuse a request whose text could not be stored or logged (a lone surrogate in a
        key, a name, a source): the requester gets a ValueError, the log one plain line."""
        for field in message:
            if (
                isinstance(field, str)
                and not field.isascii()
                and (problem := unencodable(field)) is not None
            ):
                break
        else:
            return True
        what = type(message).__name__
        log.warning("refused a %s from %s (%s): %s", what, self.name, self.address, problem)
        rid = getattr(message, "rid", 0)
        if rid:
            refusal = failure(rid, ValueError(f"the loader refused the {what}: {problem}"))
            if self._handle == self._answer_probe:  # a probe is no member: deliver skips it
                _ProbeReplies(self).deliver(refusal)
            else:
                self.deliver(refusal)
        return False

    def _accept_probe(self, name: str) -> None:
        """Welcome a one-shot status client (``clustorage status``): it never joins, so it
        is not a node, gets no Members or pushes, and may ask only Status and History."""
        self.name = name
        self._handle = self._answer_probe
        self._conn.accept(self._welcome())
        self._write(self._conn.data_to_send())
        self._trusted()
        log.debug("%s probes from %s", printable(name), self.address)

    def _answer_probe(self, peer: Any, message: messages.Message) -> None:
        if type(message) in (messages.Status, messages.History):
            self._core.handle(_ProbeReplies(self), message)
        else:
            log.warning(
                "closed %s (%s): a probe sent a %s", self.address, self.name, type(message).__name__
            )
            self.close()

    def _replaces(self, clash: Any) -> bool:
        """A node reconnecting before its old connection timed out replaces it."""
        if isinstance(clash, ServerConnection) and clash.session and clash.session == self.session:
            log.info(
                "%s reconnected from %s; dropping its old connection", clash.name, self.address
            )
            self._core.detach(clash)
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
        transport = self._transport
        if not self._joined or transport is None or transport.is_closing():
            return
        # SPEC "Wire and trust": what the loader pushes unasked (hot-loads, deletions,
        # membership) counts against the backlog cap; a member that stopped reading is
        # dropped there, and resyncs when it reads again. Answers to its own requests do
        # not count (a member that stopped reading asks nothing), nor does a resync's
        # entries: each is one the loader holds, sent once per connection.
        # What counts is what waits in the outbox: once the member stops reading, the
        # stream pauses (at its high-water mark) and every push waits there. The stream's
        # own buffer is left out: it may hold a big answer the member is reading.
        resync = type(message) is messages.SyncEntry
        counted = not resync and getattr(message, "rid", None) is None
        if counted and self._queued > self._timing.write_limit:
            self._drop_for_backlog(self._queued + transport.get_write_buffer_size())
            return
        envelope, blob = messages.encode_parts(message) if parts is None else parts
        if self._outbox or self._paused or resync or len(blob) >= BULK:
            self._conn.check_length(len(envelope) + len(blob))  # refused here, not when queued
            # Queued as the parts the loader shares between members (a broadcast is encoded
            # once); this member's frame is made from them only when it drains.
            self._queue(envelope, blob, counted)  # frames are numbered in the order they go
        else:  # nothing waits to go before it: straight out (send_small checks the length)
            transport.write(self._conn.send_small(envelope, blob))
            self.last_sent = time.monotonic()

    def _drop_for_backlog(self, backlog: int) -> None:
        log.warning(
            "closed %s (%s): it stopped reading, with %d MiB unsent, over the backlog cap of "
            "%d MiB; it resyncs when it reads again",
            self.address,
            self.name,
            backlog >> 20,
            self._timing.write_limit >> 20,
        )
        self.close()
        if self._loop is not None:  # once the transport has let go of its buffers
            self._loop.call_later(0.1, release_memory)

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
        """Called every half heartbeat (``now``: time.monotonic()): keep idle connections
        carrying, and tell a peer that stopped reading from one that is gone."""
        timing = self._timing
        if not self._joined:  # its handshake has a deadline of its own
            return
        # Neither "silent" nor "slow to read" for too long: a busy member is not a dead one
        # (SPEC "Busy is not dead"). The kernel tells a dead one (clustorage.liveness); one
        # that stops reading is dropped when its backlog passes the write limit (deliver).
        if now - self.last_sent >= timing.heartbeat and not self._outbox:
            self._write(self._conn.heartbeat())
        transport = self._transport
        if self._window is not None and transport is not None and not self._window.alive(now):
            log.warning(
                "closed %s (%s): its window stayed closed and its host stopped answering for "
                "%gs (dead_after)",
                self.name,
                self.address,
                timing.dead_after,
            )
            transport.abort()


class _ProbeReplies:
    """A probe as LoaderCore sees it while answering: its answers go out as frames of their
    own, not counted against the write limit (the probe is not a member)."""

    def __init__(self, connection: ServerConnection) -> None:
        self.connection = connection
        self.name = connection.name
        self.address = connection.address
        self.connected_since = connection.connected_since

    def deliver(
        self, message: messages.Message, parts: tuple[bytes, messages.Payload] | None = None
    ) -> None:
        envelope, blob = messages.encode_parts(message) if parts is None else parts
        self.connection._queue(envelope, blob, False)
