"""The loader's logic: the authoritative store, compute leases, definitions and broadcasts.

Theory of operation
-------------------
The loader is the single source of truth. Everything here runs on one thread (the loader's
event loop), so there are no locks. The loop only decides: store writes go to ``Writes``
(a writer thread, group commit) and compiling goes ``Aside`` (a worker thread); their
results come back to the loop. Meanwhile requests on that same entry wait their turn, in
order, and every other request is served (SPEC "The loader never stalls").

* Peers are the connected nodes, the loader's own node included (as an in-process peer).
  A peer is anything with a ``name`` and a non-blocking ``deliver(message)``.
* Values: a ``Fetch`` with ``lease`` set for a missing key makes the asker the key's
  leaseholder (``LeaseGranted``); later askers are told ``Queued`` and wait in line. The
  leaseholder's ``Commit`` (showing its lease's token) is stored, then hot-loaded to every
  other peer, then answered; each waiter gets the value. A ``Release`` (its fn raised) or
  the leaseholder leaving passes the lease to the next waiter still connected; a Commit
  whose lease passed on is refused (``LeaseLost``); a wait that would close a cycle of
  keys is refused (``DeadlockError``). See :mod:`clustorage.leases` (SPEC "get" 3-4).
* Every change of an entry has a version, a deletion too (a tombstone), so that replicas
  converge whatever order they hear of changes in (SPEC "Replicas converge").
* Functions: a ``Define`` is compiled here; unchanged source makes no new version. A new
  version is stored, then sent to every peer with ``ack`` set; the definer gets ``Defined``
  once every peer connected at that moment has answered ``Loaded``, left, or the ack timeout
  passed (SPEC "call" 7).
* Every version is committed to the store before anyone is told of it (SPEC "Durability").
* A peer that joins sends ``Sync`` with the versions it holds and receives what differs:
  big entries as ``SyncEntry`` frames of their own, then a ``SyncReply`` with the rest.
* With standbys on one PostgreSQL store, each lease is also recorded there (``LeaseBook``)
  before its holder hears of it; a loader that takes over adopts them (SPEC "High
  availability"), so a holder still computing commits to it and the waiters wait for it.
* A lease outlives its holder's connection for a while: a node's first message on a new
  connection (``Reclaim``) names the leases whose fn it runs, and it keeps them. A waiter
  cut off asks again with an ``Await`` naming the holder; a loader that restarted (and so
  knows no lease) keeps the key for that holder until it comes back or ``lease_grace``
  passes, instead of granting the lease a second time.
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import codec
from .bulk import VERIFIED, Spill
from .compiler import compile_function
from .config import EAGER_LIMIT
from .errors import (
    ClustorageError,
    CompileError,
    DeadlockError,
    LeaseLost,
    RemoteProtocolError,
    StoreError,
    ValueTooLarge,
)
from .fanout import Fanout
from .keys import printable, unencodable
from .leases import Lease, Leases, base_version
from .messages import (
    FUNCTION,
    VALUE,
    Announce,
    Await,
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
    NotLoaded,
    Payload,
    Put,
    Queued,
    Reclaim,
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
from .writes import Aside, WriteHere, Writes, work_here

__all__ = ["LoaderCore", "Peer", "failure"]

log = logging.getLogger(__name__)

# A change whose payload is bigger goes to each node at once, in a frame of its own, not
# copied into the fan-out's frame.
FANOUT_INLINE = 64 << 10

# How many bytes of entries a SyncReply carries at most (the others go before it), and
# about how many an entry takes besides its key, payload and source.
SYNC_INLINE = 1 << 20
_INLINE_OVERHEAD = 64


def _deadlock_message(chain: list[str], holder: str) -> str:
    path = " -> ".join(repr(key) for key in chain)
    if len(chain) == 2:
        return f"the fn computing {chain[0]!r} needs {chain[0]!r} itself; compute it another way"
    return (
        f"waiting for {chain[1]!r} (computed by {holder}) would never end: {path}; each of "
        f"these keys' fn needs the next one. Break the cycle"
    )


def _remember(
    record: dict[Any, Any], what: object, value: object = None, limit: int | None = None
) -> None:
    """Add ``what`` to ``record``, the oldest going past ``limit`` (LOST_KEPT)."""
    record[what] = value
    if len(record) > (LOST_KEPT if limit is None else limit):
        del record[next(iter(record))]


def _same_commit(current: Entry, peer: Peer, message: Commit) -> bool:
    """Whether ``current`` is the value ``message`` commits, from the same node."""
    return current.origin == peer.name and bytes(current.payload) == bytes(joined(message.payload))


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
class _Definition:
    requester: Peer
    rid: int
    entry: Entry
    waiting: set[str]
    installed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # could not install it
    timer: Timer | None = None


class LeaseBook(Protocol):
    """Where a loader keeps its leases, so that a takeover (clustorage.pgstore) or a
    restart (clustorage.lease_file) sees which keys were being computed, by whom."""

    ends_with_value: bool  # committing a value of a key ends its lease's record too

    def lease_granted(self, key: str, holder: str, token: int) -> None: ...

    def lease_ended(self, key: str) -> None:
        """Nobody computes ``key`` any more."""
        ...

    def leases(self) -> list[tuple[str, str, int]]: ...


class _Absent:
    """The holder of a lease granted by a former loader, until it asks again or commits."""

    address = "?"
    connected_since = 0.0

    def __init__(self, name: str) -> None:
        self.name = name

    def deliver(self, message: Message, parts: tuple[bytes, Payload] | None = None) -> None:
        pass


def failure(rid: int, exc: BaseException) -> Failed:
    """The Failed answer that carries ``exc`` to the requester."""
    details: dict[str, Any] = {}
    if isinstance(exc, CompileError):
        details = {"name": exc.name, "lineno": exc.lineno, "offset": exc.offset, "text": exc.text}
        return Failed(rid, "CompileError", exc.msg, details)
    return Failed(rid, type(exc).__name__, str(exc), details)


KEPT_PER_ASKER = 1024  # keys one connection's Awaits may keep for absent holders
QUEUED_AFTER = 0.5  # seconds a request waits behind a write before its node is told
COMMITS_KEPT = 4096  # leaseholders' commits remembered, to answer one sent again
LOST_KEPT = 16384  # leases that ended for their holder, remembered to refuse a late commit


def _claims(leases: Any) -> list[tuple[str, int]]:
    """The well-formed ``(key, token)`` pairs of a Reclaim."""
    return [
        (key, token)
        for key, token in (pair for pair in leases if type(pair) is tuple and len(pair) == 2)
        if type(key) is str and type(token) is int and unencodable(key) is None
    ]


_ANSWERED = frozenset({Fetch, Await, Put, Commit, Delete, Define})  # Release is told nothing


def _nothing() -> None:
    pass


def _tell_queued(peer: Peer, message: Message, waited: float) -> None:
    """Tell the node of a request that waits its turn (one it waits the answer of)."""
    if type(message) in _ANSWERED and (rid := getattr(message, "rid", 0)):
        peer.deliver(Queued(rid, "", waited))


def _subject(message: Message) -> tuple[str, str] | None:
    """The entry a request reads or writes; requests on one entry are handled in order."""
    kind = type(message)
    if kind is Fetch or kind is Delete:
        return message.kind, message.key  # type: ignore[union-attr]
    if kind is Commit or kind is Put or kind is Release or kind is Await:
        return VALUE, message.key  # type: ignore[union-attr]
    if kind is Define:
        return FUNCTION, message.name  # type: ignore[union-attr]
    return None


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
        writes: Writes | None = None,
        aside: Aside = work_here,
        eager_limit: int = EAGER_LIMIT,
        soon: Callable[[Callable[[], None]], object] | None = None,
        book: LeaseBook | None = None,
        lease_grace: float = 0.0,
    ) -> None:
        self.name = name
        self.address = address
        self.store_identity = store.identity
        self._max_frame = max_frame
        self._eager_limit = eager_limit
        self._sync_inline = min(SYNC_INLINE, max_frame // 4)
        self._synced: set[int] = set()  # peers (by id) that had their resync
        self._reclaimed: set[int] = set()  # ... that said which leases they still hold
        self._kept: collections.Counter[int] = collections.Counter()  # keys kept, by asker
        self.started = time.time()
        self._store = store
        self._writes: Writes = writes if writes is not None else WriteHere(store)
        self._aside = aside
        self._schedule = schedule
        self._ack_timeout = ack_timeout
        self.entries: dict[tuple[str, str], Entry] = {
            (entry.kind, entry.key): entry for entry in store.current()
        }
        self._last_version = store.last_versions()
        log.info("store %s: %d entries", store.path, len(self.entries))
        self.peers: dict[str, Peer] = {}
        self._fanout = Fanout(
            self._remote_peers,
            soon if soon is not None else lambda call: schedule(0, call),
            schedule,
            limit=max_frame,
        )
        self._leases = Leases(self._written_version)
        # The last commits stored, by (key, token): the node's name, the entry it made. A
        # commit sent again (its answer was cut off) gets that answer again, even after a
        # delete: it is not stored over a newer change (SPEC "Replicas converge"). Kept in
        # memory only: a loader that restarts forgets them.
        self._commits: dict[tuple[str, int], tuple[str, Entry]] = {}
        # Leases their holder lost, by (key, token): passed on to another node, or ended by a
        # value stored (its own commit, or a put). A late commit or a Reclaim of one is
        # refused, even once the key is deleted. A lease let go with nobody waiting is not
        # lost: its holder may take it back. Memory only, too.
        self._lost_leases: dict[tuple[str, int], None] = {}
        # The same, by (key, holder's name), for a lease kept under token 0 (an Await kept
        # the key for a holder whose token this loader never knew).
        self._lost_unnumbered: dict[tuple[str, str], None] = {}
        # Leases let go with nobody waiting, by (key, token): the key's version then. Not
        # lost, unless the key changed since (another node's value, a put, a delete).
        self._let_go: dict[tuple[str, int], int] = {}
        self._lease_grace = lease_grace
        self._book = book
        # Entries being written or compiled, with the requests that wait their turn; since
        # when each is, and the timer that tells those requests to be patient.
        self._busy: dict[tuple[str, str], collections.deque[tuple[Peer, Message]]] = {}
        self._busy_since: dict[tuple[str, str], float] = {}
        self._patience: dict[tuple[str, str], Timer] = {}
        self._writing: set[tuple[str, str]] = set()  # entries whose new version is on its way
        if book is not None:
            self._adopt(book)
        self._definitions: list[_Definition] = []
        self._handlers: dict[type, Callable[[Peer, Any], None]] = {
            Fetch: self._fetch,
            Await: self._await,
            Reclaim: self._reclaim,
            Commit: self._commit,
            Release: self._release,
            Put: self._put,
            Define: self._define,
            Delete: self._delete,
            Sync: self._sync,
            Status: self._status,
            History: self._history,
            Loaded: self._loaded,
            NotLoaded: self._loaded,
        }

    # -- membership ------------------------------------------------------------------------

    def clash(self, name: str) -> Peer | None:
        """The live peer already called ``name``, if any."""
        return self.peers.get(name)

    def join(self, peer: Peer) -> None:
        """Add an authenticated peer whose name is free (check :meth:`clash` first)."""
        self.peers[peer.name] = peer
        log.info("%s joined from %s (%d nodes)", peer.name, peer.address, len(self.peers))
        self._announce_member(peer.name, True)

    def _alive(self, peer: Peer) -> bool:
        return self.peers.get(peer.name) is peer

    def leave(self, peer: Peer) -> None:
        """Forget ``peer``: its leases pass on, definitions stop waiting for it."""
        self._synced.discard(id(peer))
        self._reclaimed.discard(id(peer))
        self._kept.pop(id(peer), None)
        if self.peers.get(peer.name) is not peer:
            return
        del self.peers[peer.name]
        log.info("%s left (%d nodes)", peer.name, len(self.peers))
        for lease in self._leases.forget_waits_of(peer):
            if not lease.committing:  # else its write settles it
                self._pass_lease(lease)
        for definition in list(self._definitions):
            if definition.requester is peer:
                self._finish(definition, answer=False)
            elif peer.name in definition.waiting:
                definition.waiting.discard(peer.name)
                self._maybe_finish(definition)
        self._announce_member(peer.name, False)

    def arriving_blob(self, size: int) -> Spill | None:
        """Where a big payload arriving from a member is written meanwhile (see
        :meth:`clustorage.store.Store.arriving_blob`)."""
        return self._store.arriving_blob(size)

    def member_names(self) -> tuple[str, ...]:
        others = sorted(name for name in self.peers if name != self.name)
        return (self.name, *others)

    def _announce_member(self, name: str, connected: bool) -> None:
        local = self.peers.get(self.name)
        if local is not None:
            local.deliver(Members((name,), ()) if connected else Members((), (name,)))
        self._fanout.membership(name, connected)

    def _remote_peers(self) -> list[Peer]:
        return [peer for name, peer in self.peers.items() if name != self.name]

    # -- dispatch --------------------------------------------------------------------------

    def handle(self, peer: Peer, message: Message) -> None:
        """Carry out one message from ``peer``; answers go back through ``peer.deliver``.

        A request on an entry being written or compiled waits its turn (SPEC "The loader
        never stalls": only the requests on that entry wait)."""
        where = _subject(message)
        if where is not None and where in self._busy:
            self._busy[where].append((peer, message))
            self._mind_the_wait(where, peer, message)
            return
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

    def _hold(self, where: tuple[str, str]) -> None:
        """The entry is being written (or defined): requests on it wait their turn."""
        self._busy.setdefault(where, collections.deque())
        self._busy_since[where] = time.monotonic()

    def _mind_the_wait(self, where: tuple[str, str], peer: Peer, message: Message) -> None:
        """A request waits behind a write of its entry (a 900 MB value on a slow disk, a
        definition slow to compile): past QUEUED_AFTER its node is told so (Queued), and
        waits on, as for a lease, instead of giving up at its timeout. The Queued names no
        holder: a write is no lease, which a node cut off would ask to be kept for it."""
        since = self._busy_since.get(where, time.monotonic())
        waited = time.monotonic() - since
        if waited >= QUEUED_AFTER:
            _tell_queued(peer, message, waited)
        elif where not in self._patience:
            later = functools.partial(self._tell_waiting, where)
            self._patience[where] = self._schedule(QUEUED_AFTER - waited, later)

    def _tell_waiting(self, where: tuple[str, str]) -> None:
        self._patience.pop(where, None)
        since = self._busy_since.get(where, time.monotonic())
        for peer, message in self._busy.get(where, ()):
            if self._alive(peer):
                _tell_queued(peer, message, time.monotonic() - since)

    def _telling(self, asker: tuple[Peer, int] | None, size: int) -> Callable[[], None]:
        """Tell ``asker`` (a peer and its request's number) to wait on if its write of
        ``size`` bytes, when written off the loop, is not done within QUEUED_AFTER; returns
        what to call once it is done (not told after that, whatever the timer does)."""
        if asker is None or size < self._writes.off_loop_from:
            return _nothing
        peer, rid = asker
        done = False

        def tell() -> None:
            if not done and self._alive(peer):
                peer.deliver(Queued(rid, "", QUEUED_AFTER))

        timer = self._schedule(QUEUED_AFTER, tell)

        def answered() -> None:
            nonlocal done
            done = True
            timer.cancel()

        return answered

    def _unhold(self, where: tuple[str, str]) -> None:
        """The entry is written: handle, in order, the requests that waited for it."""
        self._busy_since.pop(where, None)
        if (timer := self._patience.pop(where, None)) is not None:
            timer.cancel()
        waiting = self._busy.pop(where, None)
        while waiting:
            peer, message = waiting.popleft()
            if where in self._busy:  # one of them is writing it again: the rest wait on
                for waiter, request in [(peer, message), *waiting]:
                    self._busy[where].append((waiter, request))
                    self._mind_the_wait(where, waiter, request)
                return
            if self._alive(peer):
                self.handle(peer, message)

    def _then(self, peer: Peer, rid: int, action: Callable[[], None]) -> None:
        """Run ``action`` after a write or a compile; a failure goes to the requester."""
        try:
            action()
        except ClustorageError as exc:
            peer.deliver(failure(rid, exc))
        except (Exception, SystemExit) as exc:
            log.exception("failed to finish a request from %s", peer.name)
            peer.deliver(failure(rid, exc))

    def _broadcast(self, message: Message, skip: Peer | None = None) -> None:
        """Tell every node but ``skip`` of a change: small ones in the fan-out's next pass
        (where ``skip`` may hear of it too, harmlessly: it has that version), big values
        announced, other big ones at once, encoded once."""
        local = self.peers.get(self.name)
        entry = getattr(message, "entry", None)
        if entry is not None and self._on_demand(entry):
            self._fanout.push(Announce(entry.without_payload(), len(entry.payload)))
        elif entry is None or len(entry.payload) <= FANOUT_INLINE:
            # A definition is waited for: it does not wait for the fan-out's rest.
            urgent = isinstance(message, Load) and message.ack
            self._fanout.push(message, skip, urgent=urgent)
        else:
            parts = encode_parts(message)
            for peer in self._remote_peers():
                if peer is not skip:
                    peer.deliver(message, parts)
        if local is not None and local is not skip:
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
        self,
        kind: str,
        key: str,
        payload: Blob,
        source: str | None,
        origin: str,
        then: Callable[[Entry | None, BaseException | None], None],
        asker: tuple[Peer, int] | None = None,
    ) -> None:
        """Write a new version of ``key``; ``then(entry, None)`` once it is durable (and the
        loader's own), or ``then(None, error)``. Requests on the entry wait meanwhile, and
        so does ``asker`` (a peer and its request's number) for the answer: told so past
        QUEUED_AFTER, if the write is one that may take long (see :meth:`_telling`)."""
        where = (kind, key)
        entry = Entry(
            kind, key, self._next_version(kind, key), payload, source, origin, time.time()
        )
        try:
            self._check_sendable(entry)
        except ValueTooLarge:
            self._last_version[where] -= 1
            raise
        current = self.entries.get(where)
        previous = current.version if current is not None else 0
        self._hold(where)
        self._writing.add(where)
        answered = self._telling(asker, len(payload))

        def written(stored: Blob | None, error: BaseException | None) -> None:
            self._writing.discard(where)
            answered()
            kept = entry
            if stored is not None and stored is not entry.payload:
                VERIFIED.carry(entry.payload, stored)  # the file's bytes were verified
                kept = entry._replace(
                    payload=stored  # served from the store from now on, not from memory
                )
            if error is None:
                self.entries[where] = kept
            else:
                self._last_version[where] -= 1  # nothing else numbered it meanwhile: held
            try:
                then(None if error else kept, error)
            finally:
                self._unhold(where)

        self._writes.commit(entry, previous, written)

    # -- leases kept in the store (loaders with standbys) ----------------------------------

    def _adopt(self, book: LeaseBook) -> None:
        """Take over the leases of a former loader (this one before a restart, or the
        active one before a takeover): their holders may still commit (with their token)
        or reclaim them; after ``lease_grace`` seconds, the others' waiters get them."""
        adopted = []
        for key, holder, token in book.leases():
            # A lease of the loader's own node ended with the process that held it; one of
            # a key with a value ended with its commit (its end may not have been recorded).
            if (VALUE, key) in self.entries or holder == self.name or self._changed(key, token):
                self._book_end(key)
            else:
                lease = self._leases.adopt(key, _Absent(holder), token)
                self._keep_for(lease, holder)
                adopted.append(lease)
        if adopted:
            log.info("took over %d leases: %s", len(adopted), [lease.key for lease in adopted])

    def detach(self, peer: Peer) -> None:
        """``peer``'s connection is being replaced by a new one of the same node: its leases
        wait for that one to reclaim them (or for ``lease_grace``), instead of passing on."""
        for lease in self._leases:
            if lease.holder is peer:
                self._keep_for(lease, peer.name)

    def _keep_for(self, lease: Lease, holder: str) -> None:
        """Keep ``lease`` for node ``holder``, away now, until it reclaims the lease or
        ``lease_grace`` passes; then the lease passes on."""
        absent = lease.holder = _Absent(holder)

        def expire() -> None:
            kept = self._leases.get(lease.key) is lease and lease.holder is absent
            if kept and not lease.committing:
                log.info("%s: its holder %s did not come back", printable(lease.key), holder)
                self._pass_lease(lease)

        self._schedule(self._lease_grace, expire)

    def _reclaim(self, peer: Peer, message: Reclaim) -> None:
        """A node's first word on a new connection: the leases whose fn it runs. It keeps
        them; a lease kept for it that it does not name passes on."""
        if id(peer) in self._reclaimed or id(peer) in self._synced:
            raise RemoteProtocolError("a connection reclaims its leases once, first")
        self._reclaimed.add(id(peer))
        claimed = {
            key: token
            for key, token in _claims(message.leases)
            if not self._lost(key, token, peer.name)  # passed on, or ended by a value
        }
        for lease in self._leases:
            if type(lease.holder) is not _Absent or lease.holder.name != peer.name:
                continue
            token = claimed.pop(lease.key, None)
            if token is not None and lease.token in (0, token):
                lease.holder, lease.token = peer, token
                self._book_holder(lease)
            elif not lease.committing:
                self._pass_lease(lease)
        for key, token in claimed.items():
            if (VALUE, key) in self.entries or self._leases.get(key) is not None:
                continue  # it passed on meanwhile: the holder's commit is refused (LeaseLost)
            self._book_holder(self._leases.adopt(key, peer, token))
            log.info("%s: %s still computes it", printable(key), peer.name)

    def _await(self, peer: Peer, message: Await) -> None:
        """A Fetch asked again by a waiter cut off from ``holder``'s lease. A holder that has
        not resynced since this loader started may still be computing: the key waits for
        it, as for a holder a takeover adopted."""
        key, holder = message.key, message.holder
        if (
            holder  # a node's name; a wait behind a write names nobody, and keeps nothing
            and (VALUE, key) not in self.entries
            and self._leases.get(key) is None
            and holder != self.name
            and not self._back(holder)
            and self._kept[id(peer)] < KEPT_PER_ASKER
        ):
            self._kept[id(peer)] += 1
            self._keep_for(self._leases.adopt(key, _Absent(holder), 0), holder)
            log.info("%s: waiting for %s to come back", printable(key), printable(holder))
        self._fetch(peer, Fetch(message.rid, VALUE, key, True, tuple(message.holding)))

    def _back(self, name: str) -> bool:
        """Whether node ``name`` is connected again and said which leases it holds (or,
        being of an earlier release, resynced without saying)."""
        peer = self.peers.get(name)
        return peer is not None and (id(peer) in self._reclaimed or id(peer) in self._synced)

    def _book_grant(self, lease: Lease) -> None:
        if self._book is not None:
            self._book.lease_granted(lease.key, lease.holder.name, lease.token)

    def _book_holder(self, lease: Lease) -> None:
        """Record ``lease``'s holder, or say in the log that it could not be: the lease
        stands either way (a fresh grant's record, by contrast, comes first)."""
        try:
            self._book_grant(lease)
        except StoreError as exc:
            log.warning("%s: its holder was not recorded: %s", printable(lease.key), exc)

    def _book_end(self, key: str) -> None:
        if self._book is not None:
            try:
                self._book.lease_ended(key)
            except StoreError as exc:
                log.warning("%s: the end of its lease was not recorded: %s", printable(key), exc)

    # -- values ----------------------------------------------------------------------------

    def _fetch(self, peer: Peer, message: Fetch) -> None:
        entry = self.entries.get((message.kind, message.key))
        if entry is not None:
            peer.deliver(Found(message.rid, entry))
        elif not message.lease or message.kind != VALUE:
            peer.deliver(NotFound(message.rid))
        elif (lease := self._leases.get(message.key)) is None:
            lease = self._leases.grant(message.key, peer, message.rid, message.holding)
            try:
                self._book_grant(lease)
            except StoreError:
                self._leases.settle(message.key)
                raise
            peer.deliver(LeaseGranted(message.rid, lease.token))
        elif type(lease.holder) is _Absent and lease.holder.name == peer.name:
            # Its holder asks again after a takeover: its lease, with the same token (one of
            # this loader's, if it was kept without one: 0 names no lease).
            lease.holder, lease.rid, lease.holding = peer, message.rid, message.holding
            if not lease.token:
                self._leases.renumber(lease)
                self._book_holder(lease)
            peer.deliver(LeaseGranted(message.rid, lease.token))
        elif chain := self._leases.cycle(message.key, peer, message.holding):
            raise DeadlockError(_deadlock_message(chain, lease.holder.name))
        else:
            self._leases.wait(lease, peer, message.rid, message.holding)
            peer.deliver(Queued(message.rid, lease.holder.name, time.monotonic() - lease.since))

    def _commit(self, peer: Peer, message: Commit) -> None:
        """Store a leaseholder's value. Refused (LeaseLost) when the lease passed on, or a
        value ended it (even one deleted since), or the key has a value; accepted without a
        lease when nobody holds one and the key has none (its holder was cut off with nobody
        waiting, or the loader restarted, or took over, while fn ran). One stored already
        (sent again) is answered as it was, and not stored again."""
        key = message.key
        lease = self._leases.get(key)
        current = self.entries.get((VALUE, key))
        if (stored_before := self._stored_commit(peer, key, message.token)) is not None:
            # Sent again (its first answer was cut off): already stored, maybe deleted since.
            peer.deliver(Committed(message.rid, stored_before, True))
            return
        if lease is None and current is not None and _same_commit(current, peer, message):
            # Sent again after a takeover (its first answer was lost): already stored.
            peer.deliver(Committed(message.rid, current.without_payload(), True))
            return
        lost = self._lost(key, message.token, peer.name)
        kept_for_it = (
            lease is not None
            and type(lease.holder) is _Absent
            and lease.holder.name == peer.name
            and lease.token == 0
            and not lost
        )
        if (lease is not None and lease.token != message.token and not kept_for_it) or (
            lease is None and ((VALUE, key) in self.entries or lost)
        ):
            why = (
                f"to {lease.holder.name} (it was cut off from the loader)"
                if lease is not None
                else f"when {current.origin} stored a value of it"
                if current is not None
                else "while it was cut off (the lease passed on, or its key was put or deleted)"
            )
            raise LeaseLost(
                f"{peer.name} lost its lease on {key!r} {why}; its value was not stored: "
                f"get {key!r} again for the cluster's value"
            )
        if lease is not None:
            lease.committing = True  # it settles when written: it does not pass on meanwhile

        def stored(entry: Entry | None, error: BaseException | None) -> None:
            if error is not None:
                self._uncommit(key, lease)
                raise error
            assert entry is not None
            answer = entry.without_payload()
            if message.token:  # 0 (a lease kept without its token) names no commit
                _remember(self._commits, (key, message.token), (peer.name, answer), COMMITS_KEPT)
                self._lease_lost(key, message.token, peer.name)  # also stored without a lease
            peer.deliver(Committed(message.rid, answer, True))
            self._settle(key, entry, skip=peer)

        try:
            self._store_entry(
                VALUE,
                key,
                joined(message.payload),
                None,
                peer.name,
                lambda entry, error: self._then(peer, message.rid, lambda: stored(entry, error)),
                (peer, message.rid),
            )
        except ValueTooLarge:
            self._uncommit(key, lease)
            raise

    def _lost(self, key: str, token: int, holder: str) -> bool:
        """Whether ``holder``'s lease ``token`` on ``key`` was lost here: its value would
        be a second one, or undo a delete made since."""
        if self._changed(key, token):  # what a put or a delete since left, a restart too
            return True
        lease = self._leases.get(key)
        if lease is not None and lease.token == token:
            return False
        if (key, token) in self._lost_leases:
            return True
        let_go = self._let_go.get((key, token))
        if let_go is not None and let_go != self._written_version(key):
            return True
        unnumbered = not self._leases.granted_here(token)  # kept, maybe, under token 0
        return unnumbered and (key, holder) in self._lost_unnumbered

    def _changed(self, key: str, token: int) -> bool:
        """Whether ``key`` was written (a put, or a delete) since the lease ``token`` was
        given for it (False when the token does not say)."""
        base = base_version(token)
        return base is not None and self._written_version(key) > base

    def _written_version(self, key: str) -> int:
        """``key``'s last version written (a write on its way does not count)."""
        where = (VALUE, key)
        return self._last_version.get(where, 0) - (where in self._writing)

    def _lease_lost(self, key: str, token: int, holder: str) -> None:
        if token:
            _remember(self._lost_leases, (key, token))
        else:
            _remember(self._lost_unnumbered, (key, holder))

    def _stored_commit(self, peer: Peer, key: str, token: int) -> Entry | None:
        """The entry that ``peer``'s node's commit of ``key`` under ``token`` made, if it was
        stored lately."""
        stored = self._commits.get((key, token)) if token else None
        return stored[1] if stored is not None and stored[0] == peer.name else None

    def _uncommit(self, key: str, lease: Lease | None) -> None:
        """A leaseholder's value was not stored: the lease passes to the next waiter."""
        if lease is not None and self._leases.get(key) is lease and lease.committing:
            lease.committing = False
            self._pass_lease(lease)

    def _put(self, peer: Peer, message: Put) -> None:
        def stored(entry: Entry | None, error: BaseException | None) -> None:
            if error is not None:
                raise error
            assert entry is not None
            peer.deliver(Committed(message.rid, entry.without_payload(), True))
            self._settle(message.key, entry, skip=peer)

        self._store_entry(
            VALUE,
            message.key,
            joined(message.payload),
            None,
            peer.name,
            lambda entry, error: self._then(peer, message.rid, lambda: stored(entry, error)),
            (peer, message.rid),
        )

    def _settle(self, key: str, entry: Entry, skip: Peer) -> None:
        """Hot-load a new value everywhere and answer everyone waiting on its lease."""
        self._broadcast(Load(entry, ack=False), skip=skip)
        lease = self._leases.get(key)
        if lease is not None:
            self._lease_lost(key, lease.token, lease.holder.name)
        for waiter in self._leases.settle(key):
            waiter.peer.deliver(Found(waiter.rid, entry))
        if lease is not None and self._book is not None and not self._book.ends_with_value:
            self._book_end(key)

    def _release(self, peer: Peer, message: Release) -> None:
        """The holder's fn failed (``rid`` 0), or a caller stopped waiting for ``rid``."""
        lease = self._leases.get(message.key)
        if lease is None or lease.committing:
            return
        if lease.holder is peer and message.rid in (0, lease.rid):
            log.info(
                "%s: fn failed on %s (%s)",
                printable(message.key),
                peer.name,
                printable(message.reason),
            )
            self._pass_lease(lease)
        elif message.rid:
            self._leases.withdraw(lease, peer, message.rid)

    def _pass_lease(self, lease: Lease) -> None:
        token, holder = lease.token, lease.holder.name
        if self._leases.pass_on(lease, self._alive) is None:
            if token:
                _remember(self._let_go, (lease.key, token), self._written_version(lease.key))
            self._book_end(lease.key)
            return
        self._lease_lost(lease.key, token, holder)
        self._book_holder(lease)
        lease.holder.deliver(LeaseGranted(lease.rid, lease.token))
        for waiter in lease.waiters:  # who they wait for now: whom to name if cut off
            waiter.peer.deliver(Queued(waiter.rid, lease.holder.name, 0.0))

    def _delete(self, peer: Peer, message: Delete) -> None:
        where = (message.kind, message.key)
        if where not in self.entries:
            peer.deliver(Deleted(message.rid, False, self._last_version.get(where, 0)))
            return
        version = self._next_version(*where)
        self._hold(where)
        self._writing.add(where)
        answered = self._telling((peer, message.rid), 0)

        def written(error: BaseException | None) -> None:
            self._writing.discard(where)
            answered()
            try:
                if error is not None:
                    self._last_version[where] -= 1
                    peer.deliver(failure(message.rid, error))
                    return
                self.entries.pop(where, None)
                self._broadcast(Unload(message.kind, message.key, version, peer.name))
                peer.deliver(Deleted(message.rid, True, version))
            finally:
                self._unhold(where)

        self._writes.delete(message.kind, message.key, version, peer.name, written)

    # -- functions -------------------------------------------------------------------------

    def _define(self, peer: Peer, message: Define) -> None:
        """Compile aside (module-level code may be slow), store, hot-load with acks."""
        where = (FUNCTION, message.name)
        current = self.entries.get(where)
        if current is not None and current.source == message.source and not message.force:
            peer.deliver(Defined(message.rid, current, False, self.member_names(), ()))
            return
        self._hold(where)

        def compile_aside() -> Blob:
            return codec.dump(message.name, compile_function(message.name, message.source))

        def compiled(payload: Blob | None, error: BaseException | None) -> None:
            if error is not None or payload is None:
                self._unhold(where)
                peer.deliver(failure(message.rid, error or RuntimeError("nothing compiled")))
                return
            try:  # from here the write holds the entry, and lets go of it when written
                self._store_entry(
                    FUNCTION,
                    message.name,
                    payload,
                    message.source,
                    peer.name,
                    lambda entry, error: self._then(
                        peer, message.rid, lambda: self._defined(peer, message.rid, entry, error)
                    ),
                )
            except Exception as exc:
                self._unhold(where)
                peer.deliver(failure(message.rid, exc))

        self._aside(compile_aside, compiled)

    def _defined(
        self, peer: Peer, rid: int, entry: Entry | None, error: BaseException | None
    ) -> None:
        if error is not None:
            raise error
        assert entry is not None
        definition = _Definition(peer, rid, entry, set(self.peers))
        self._definitions.append(definition)
        definition.timer = self._schedule(
            self._ack_timeout, lambda: self._finish(definition, answer=True)
        )
        self._broadcast(Load(entry, ack=True))
        log.info("%s v%d defined by %s", entry.key, entry.version, peer.name)

    def _loaded(self, peer: Peer, message: Loaded | NotLoaded) -> None:
        for definition in list(self._definitions):
            entry = definition.entry
            if (entry.kind, entry.key, entry.version) == tuple(message) and (
                peer.name in definition.waiting
            ):
                definition.waiting.discard(peer.name)
                if type(message) is Loaded:
                    definition.installed.append(peer.name)
                else:
                    log.warning(
                        "%s could not load %s %r version %d (its log says why)",
                        peer.name,
                        *message,
                    )
                    definition.failed.append(peer.name)
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
                    tuple(sorted({*definition.waiting, *definition.failed})),
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
        removed = tuple(
            (kind, key, self._last_version.get((kind, key), 0))
            for (kind, key), version in held.items()
            if (kind, key) not in self.entries
            and not version == self._last_version.get((kind, key), 0) != 0  # its tombstone
        )
        members = self.member_names()
        room = self._sync_inline - _inline_size(*(key for _, key, _ in removed), *members)
        inline: list[Entry] = []
        announced: list[Entry] = []
        for where, entry in self.entries.items():
            if held.get(where) == entry.version:
                continue
            if self._on_demand(entry):  # its bytes go only to nodes that get it
                size = _inline_size(entry.key, entry.origin)
                if size <= room:
                    announced.append(entry.without_payload())
                    room -= size
                else:
                    peer.deliver(Announce(entry.without_payload(), len(entry.payload)))
                continue
            size = len(entry.payload) + _inline_size(entry.key, entry.source or "", entry.origin)
            if size <= room:
                inline.append(entry)
                room -= size
            else:
                peer.deliver(SyncEntry(entry))
        peer.deliver(SyncReply(message.rid, tuple(inline), removed, members, tuple(announced)))

    def _on_demand(self, entry: Entry) -> bool:
        """Whether ``entry`` is a big value: announced to every node, its bytes sent only to
        those that get it (SPEC "Big values travel on demand")."""
        return entry.kind == VALUE and len(entry.payload) > self._eager_limit

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
            "leases": sorted(lease.key for lease in self._leases),
            "computing": self._leases.describe(),
        }

    def _status(self, peer: Peer, message: Status) -> None:
        peer.deliver(StatusReply(message.rid, self.status()))

    def _history(self, peer: Peer, message: History) -> None:
        entries = tuple(self._store.history(message.kind, message.key))
        peer.deliver(HistoryReply(message.rid, entries))
