"""The loader's logic: the authoritative store, compute leases, definitions and broadcasts.

Theory of operation
-------------------
The loader is the single source of truth. Everything here runs on one thread (the loader's
event loop), so there are no locks: a request is handled to completion before the next one.

* Peers are the connected nodes, the loader's own node included (as an in-process peer).
  A peer is anything with a ``name`` and a non-blocking ``deliver(message)``.
* Values: a ``Fetch`` with ``lease`` set for a missing key makes the asker the key's
  leaseholder (``LeaseGranted``); later askers are told ``Queued`` and wait in line. The
  leaseholder's ``Commit`` is stored, then hot-loaded to every other peer, then answered; each
  waiter gets the value. A ``Release`` (its fn raised) or the leaseholder leaving passes the
  lease to the next waiter still connected (SPEC "get" 3-4).
* Functions: a ``Define`` is compiled here; unchanged source makes no new version. A new
  version is stored, then sent to every peer with ``ack`` set; the definer gets ``Defined``
  once every peer connected at that moment has answered ``Loaded``, left, or the ack timeout
  passed (SPEC "call" 7).
* Every version is committed to the store before anyone is told of it (SPEC "Durability").
* A peer that joins sends ``Sync`` with the versions it holds and receives what differs:
  big entries as ``SyncEntry`` frames of their own, then a ``SyncReply`` with the rest.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import codec
from .compiler import compile_function
from .errors import (
    ClustorageError,
    CompileError,
    RemoteProtocolError,
    StoreError,
    ValueTooLarge,
)
from .keys import printable
from .messages import (
    FUNCTION,
    VALUE,
    Blob,
    Commit,
    Committed,
    Define,
    Defined,
    Delete,
    Deleted,
    Entry,
    Failed,
    Fetch,
    Found,
    History,
    HistoryReply,
    LeaseGranted,
    Load,
    Loaded,
    Members,
    Message,
    NotFound,
    Payload,
    Put,
    Queued,
    Release,
    Status,
    StatusReply,
    Sync,
    SyncEntry,
    SyncReply,
    Unload,
    encode_parts,
    joined,
)
from .store import Store

__all__ = ["LoaderCore", "Peer"]

log = logging.getLogger(__name__)

# How many bytes of entries a SyncReply carries at most (the others go before it), and
# about how many an entry takes besides its key, payload and source.
SYNC_INLINE = 1 << 20
_INLINE_OVERHEAD = 64


def _inline_size(*texts: str) -> int:
    """About how many bytes ``texts`` take inside a message, with room for framing."""
    return sum(len(text.encode(errors="surrogatepass")) + _INLINE_OVERHEAD for text in texts)


class Peer(Protocol):
    """A connected node as the loader sees it."""

    name: str
    address: str
    connected_since: float

    def deliver(self, message: Message, parts: tuple[bytes, Payload] | None = None) -> None:
        """Send ``message`` to the node without blocking (``parts``: it, already encoded)."""


class Timer(Protocol):
    def cancel(self) -> None: ...


Scheduler = Callable[[float, Callable[[], None]], Timer]


@dataclass(slots=True)
class _Lease:
    holder: tuple[Peer, int]
    waiters: collections.deque[tuple[Peer, int]] = field(default_factory=collections.deque)


@dataclass(slots=True)
class _Definition:
    requester: Peer
    rid: int
    entry: Entry
    waiting: set[str]
    installed: list[str] = field(default_factory=list)
    timer: Timer | None = None


def failure(rid: int, exc: BaseException) -> Failed:
    """The Failed answer that carries ``exc`` to the requester."""
    details: dict[str, Any] = {}
    if isinstance(exc, CompileError):
        details = {"name": exc.name, "lineno": exc.lineno, "offset": exc.offset, "text": exc.text}
        return Failed(rid, "CompileError", exc.msg, details)
    return Failed(rid, type(exc).__name__, str(exc), details)


class LoaderCore:
    """The loader's state and rules, without I/O; see the module docstring."""

    def __init__(
        self,
        name: str,
        store: Store,
        schedule: Scheduler,
        *,
        ack_timeout: float = 5.0,
        address: str = "",
        max_frame: int = 1 << 30,
    ) -> None:
        self.name = name
        self.address = address
        self.store_identity = store.identity
        self._max_frame = max_frame
        self._sync_inline = min(SYNC_INLINE, max_frame // 4)
        self._synced: set[int] = set()  # peers (by id) that had their resync
        self.started = time.time()
        self._store = store
        self._schedule = schedule
        self._ack_timeout = ack_timeout
        self.entries: dict[tuple[str, str], Entry] = {
            (entry.kind, entry.key): entry for entry in store.current()
        }
        self._last_version = store.last_versions()
        self.peers: dict[str, Peer] = {}
        self._leases: dict[str, _Lease] = {}
        self._definitions: list[_Definition] = []
        self._handlers: dict[type, Callable[[Peer, Any], None]] = {
            Fetch: self._fetch,
            Commit: self._commit,
            Release: self._release,
            Put: self._put,
            Define: self._define,
            Delete: self._delete,
            Sync: self._sync,
            Status: self._status,
            History: self._history,
            Loaded: self._loaded,
        }

    # -- membership ------------------------------------------------------------------------

    def clash(self, name: str) -> Peer | None:
        """The live peer already called ``name``, if any."""
        return self.peers.get(name)

    def join(self, peer: Peer) -> None:
        """Add an authenticated peer whose name is free (check :meth:`clash` first)."""
        self.peers[peer.name] = peer
        log.info("%s joined from %s (%d nodes)", peer.name, peer.address, len(self.peers))
        self._announce_members()

    def leave(self, peer: Peer) -> None:
        """Forget ``peer``: its leases pass on, definitions stop waiting for it."""
        self._synced.discard(id(peer))
        if self.peers.get(peer.name) is not peer:
            return
        del self.peers[peer.name]
        log.info("%s left (%d nodes)", peer.name, len(self.peers))
        for key, lease in list(self._leases.items()):
            lease.waiters = collections.deque(w for w in lease.waiters if w[0] is not peer)
            if lease.holder[0] is peer:
                self._pass_lease(key, lease)
        for definition in list(self._definitions):
            if definition.requester is peer:
                self._finish(definition, answer=False)
            elif peer.name in definition.waiting:
                definition.waiting.discard(peer.name)
                self._maybe_finish(definition)
        self._announce_members()

    def member_names(self) -> tuple[str, ...]:
        others = sorted(name for name in self.peers if name != self.name)
        return (self.name, *others)

    def _announce_members(self) -> None:
        self._broadcast(Members(self.member_names()))

    # -- dispatch --------------------------------------------------------------------------

    def handle(self, peer: Peer, message: Message) -> None:
        """Carry out one message from ``peer``; answers go back through ``peer.deliver``."""
        handler = self._handlers.get(type(message))
        if handler is None:
            log.warning("%s sent a %s, which only a loader sends", peer.name, type(message))
            return
        try:
            handler(peer, message)
        except ClustorageError as exc:
            self._fail(peer, message, exc)
        except (Exception, SystemExit) as exc:
            log.exception("failed to handle %s from %s", type(message).__name__, peer.name)
            self._fail(peer, message, exc)

    @staticmethod
    def _fail(peer: Peer, message: Message, exc: BaseException) -> None:
        rid = getattr(message, "rid", 0)
        if rid:
            peer.deliver(failure(rid, exc))
        else:
            log.warning("%s from %s failed: %s", type(message).__name__, peer.name, printable(exc))

    def _broadcast(self, message: Message, skip: Peer | None = None) -> None:
        local = self.peers.get(self.name)
        parts = None  # encoded once, for the first remote peer
        for peer in list(self.peers.values()):
            if peer is not skip and peer is not local:
                parts = encode_parts(message) if parts is None else parts
                peer.deliver(message, parts)
        if local is not None and local is not skip:  # last: the network need not wait for it
            local.deliver(message)

    def _next_version(self, kind: str, key: str) -> int:
        version = self._last_version.get((kind, key), 0) + 1
        self._last_version[(kind, key)] = version
        return version

    def _check_sendable(self, entry: Entry) -> None:
        """Refuse an entry that could not be sent to a node (a frame has a size limit)."""
        texts = len(entry.key) + len(entry.source or "") + len(entry.origin)
        room_for_names = 1024 * (len(self.peers) + 1)  # a Defined answer carries them too
        if len(entry.payload) + 4 * texts + room_for_names <= self._max_frame:  # fits surely
            return
        envelope, blob = encode_parts(Found(1 << 62, entry))  # the biggest message with it
        size = len(envelope) + len(blob) + _inline_size(*self.member_names())
        if size > self._max_frame:
            raise ValueTooLarge(
                f"{entry.key!r} would take {size} bytes to send, over the frame limit of "
                f"{self._max_frame} bytes; {codec.RAISE_THE_LIMIT}"
            )

    def _store_entry(
        self, kind: str, key: str, payload: Blob, source: str | None, origin: str
    ) -> Entry:
        entry = Entry(
            kind, key, self._next_version(kind, key), payload, source, origin, time.time()
        )
        current = self.entries.get((kind, key))
        try:
            self._check_sendable(entry)
            self._store.commit(entry, current.version if current is not None else 0)
        except (StoreError, ValueTooLarge):
            self._last_version[(kind, key)] -= 1
            raise
        self.entries[(kind, key)] = entry
        return entry

    # -- values ----------------------------------------------------------------------------

    def _fetch(self, peer: Peer, message: Fetch) -> None:
        entry = self.entries.get((message.kind, message.key))
        if entry is not None:
            peer.deliver(Found(message.rid, entry))
        elif not message.lease or message.kind != VALUE:
            peer.deliver(NotFound(message.rid))
        elif (lease := self._leases.get(message.key)) is None:
            self._leases[message.key] = _Lease((peer, message.rid))
            peer.deliver(LeaseGranted(message.rid))
        else:
            lease.waiters.append((peer, message.rid))
            peer.deliver(Queued(message.rid))

    def _commit(self, peer: Peer, message: Commit) -> None:
        existing = self.entries.get((VALUE, message.key))
        if existing is not None:
            peer.deliver(Committed(message.rid, existing, False))
            return
        try:
            entry = self._store_entry(VALUE, message.key, joined(message.payload), None, peer.name)
        except (StoreError, ValueTooLarge):
            if (lease := self._leases.get(message.key)) and lease.holder[0] is peer:
                self._pass_lease(message.key, lease)
            raise
        peer.deliver(Committed(message.rid, entry.without_payload(), True))
        self._settle(message.key, entry, skip=peer)

    def _put(self, peer: Peer, message: Put) -> None:
        entry = self._store_entry(VALUE, message.key, joined(message.payload), None, peer.name)
        peer.deliver(Committed(message.rid, entry.without_payload(), True))
        self._settle(message.key, entry, skip=peer)

    def _settle(self, key: str, entry: Entry, skip: Peer) -> None:
        """Hot-load a new value everywhere and answer everyone waiting on its lease."""
        self._broadcast(Load(entry, ack=False), skip=skip)
        lease = self._leases.pop(key, None)
        if lease is not None:
            for waiter, rid in lease.waiters:
                waiter.deliver(Found(rid, entry))

    def _release(self, peer: Peer, message: Release) -> None:
        lease = self._leases.get(message.key)
        if lease is not None and lease.holder[0] is peer:
            log.info(
                "%s: fn failed on %s (%s)",
                printable(message.key),
                peer.name,
                printable(message.reason),
            )
            self._pass_lease(message.key, lease)

    def _pass_lease(self, key: str, lease: _Lease) -> None:
        while lease.waiters:
            peer, rid = lease.waiters.popleft()
            if self.peers.get(peer.name) is peer:
                lease.holder = (peer, rid)
                peer.deliver(LeaseGranted(rid))
                return
        del self._leases[key]

    def _delete(self, peer: Peer, message: Delete) -> None:
        existed = (message.kind, message.key) in self.entries
        if existed:
            version = self._next_version(message.kind, message.key)
            self._store.delete(message.kind, message.key, version, peer.name)
            del self.entries[(message.kind, message.key)]
            self._broadcast(Unload(message.kind, message.key, peer.name))
        peer.deliver(Deleted(message.rid, existed))

    # -- functions -------------------------------------------------------------------------

    def _define(self, peer: Peer, message: Define) -> None:
        current = self.entries.get((FUNCTION, message.name))
        if current is not None and current.source == message.source and not message.force:
            peer.deliver(Defined(message.rid, current, False, self.member_names(), ()))
            return
        function = compile_function(message.name, message.source)
        payload = codec.dump(message.name, function)
        entry = self._store_entry(FUNCTION, message.name, payload, message.source, peer.name)
        log.info("%s v%d defined by %s", message.name, entry.version, peer.name)
        definition = _Definition(peer, message.rid, entry, set(self.peers))
        self._definitions.append(definition)
        definition.timer = self._schedule(
            self._ack_timeout, lambda: self._finish(definition, answer=True)
        )
        self._broadcast(Load(entry, ack=True))

    def _loaded(self, peer: Peer, message: Loaded) -> None:
        for definition in list(self._definitions):
            entry = definition.entry
            if (entry.kind, entry.key, entry.version) == tuple(message) and (
                peer.name in definition.waiting
            ):
                definition.waiting.discard(peer.name)
                definition.installed.append(peer.name)
                self._maybe_finish(definition)

    def _maybe_finish(self, definition: _Definition) -> None:
        if not definition.waiting:
            self._finish(definition, answer=True)

    def _finish(self, definition: _Definition, *, answer: bool) -> None:
        if definition not in self._definitions:
            return
        self._definitions.remove(definition)
        if definition.timer is not None:
            definition.timer.cancel()
        if answer:
            definition.requester.deliver(
                Defined(
                    definition.rid,
                    definition.entry,
                    True,
                    tuple(definition.installed),
                    tuple(sorted(definition.waiting)),
                )
            )

    # -- synchronisation and introspection -------------------------------------------------

    def _sync(self, peer: Peer, message: Sync) -> None:
        """Answer a joining peer: small entries inside the reply, up to a quarter of the frame
        limit (at most SYNC_INLINE bytes); the others before it, one frame each. No frame
        holds the whole store: a frame has a size limit, and a big one would hold up the
        loop while it is made. Once per connection: a peer's resync is not held against
        its write limit."""
        if id(peer) in self._synced:
            raise RemoteProtocolError("a connection resynchronises once, when it connects")
        self._synced.add(id(peer))
        held = message.versions
        removed = tuple(where for where in held if where not in self.entries)
        members = self.member_names()
        room = self._sync_inline - _inline_size(*(key for _, key in removed), *members)
        inline: list[Entry] = []
        for where, entry in self.entries.items():
            if held.get(where) == entry.version:
                continue
            size = len(entry.payload) + _inline_size(entry.key, entry.source or "", entry.origin)
            if size <= room:
                inline.append(entry)
                room -= size
            else:
                peer.deliver(SyncEntry(entry))
        peer.deliver(SyncReply(message.rid, tuple(inline), removed, members))

    def status(self) -> dict[str, Any]:
        """The cluster as the loader sees it (what ``clustorage status`` prints)."""
        nodes = [
            {
                "name": peer.name,
                "role": "loader" if name == self.name else "member",
                "address": peer.address,
                "connected_since": peer.connected_since,
            }
            for name, peer in sorted(self.peers.items(), key=lambda item: item[0] != self.name)
        ]
        kinds = collections.Counter(kind for kind, _ in self.entries)
        return {
            "loader": self.name,
            "address": self.address,
            "store": self._store.path,
            "started": self.started,
            "nodes": nodes,
            "keys": kinds[VALUE],
            "functions": kinds[FUNCTION],
            "leases": sorted(self._leases),
        }

    def _status(self, peer: Peer, message: Status) -> None:
        peer.deliver(StatusReply(message.rid, self.status()))

    def _history(self, peer: Peer, message: History) -> None:
        entries = tuple(self._store.history(message.kind, message.key))
        peer.deliver(HistoryReply(message.rid, entries))
