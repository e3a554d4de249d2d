"""The messages members and the loader exchange, one immutable tuple type each.

Requests carry ``rid``, a number the requester chose; the answer carries the same ``rid``.
Pushes (Load, Unload, Members) flow from the loader unasked. Values and functions travel as
cloudpickle bytes inside an :class:`Entry`; this module never unpickles them.

On the wire a message is :mod:`marshal` data: a tuple of the message's type code and its
fields, with each Entry as a plain tuple. marshal builds only plain data (it cannot name a
class or call anything), and decoding rebuilds only the message types below, so a frame's
bytes can never construct anything else. The one payload of a Commit, Put, Found, Committed
or Load travels after the marshal data as a blob (its length in its field's place), so a big
value is never copied into or out of marshal; decoding hands it out as a view of the frame.
"""

from __future__ import annotations

import marshal
from collections.abc import Callable
from typing import Any, NamedTuple

from .errors import RemoteProtocolError

__all__ = [
    "FUNCTION",
    "VALUE",
    "Announce",
    "Await",
    "Blob",
    "Commit",
    "Committed",
    "Define",
    "Defined",
    "Delete",
    "Deleted",
    "Entry",
    "Failed",
    "Fetch",
    "Found",
    "Gathered",
    "History",
    "HistoryReply",
    "LeaseGranted",
    "Load",
    "Loaded",
    "Members",
    "Message",
    "NotFound",
    "NotLoaded",
    "Payload",
    "Pushes",
    "Put",
    "Queued",
    "Reclaim",
    "Release",
    "Status",
    "StatusReply",
    "Sync",
    "SyncEntry",
    "SyncReply",
    "Unload",
    "decode",
    "encode",
    "encode_parts",
    "joined",
]

VALUE = "value"
FUNCTION = "function"

Blob = bytes | memoryview


class Gathered:
    """A payload in several buffers, sent one after another as if joined: a big value
    pickled without copying its data (see :func:`clustorage.codec.dump_borrowing`)."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: tuple[Blob, ...]) -> None:
        self.parts = parts
        self.size = sum(len(part) for part in parts)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)


Payload = Blob | Gathered


def joined(payload: Payload) -> Blob:
    """``payload`` in one buffer (a Gathered one is copied into it)."""
    return bytes(payload) if isinstance(payload, Gathered) else payload


class Entry(NamedTuple):
    """One version of a value or function, as stored and as sent."""

    kind: str
    key: str
    version: int
    payload: Blob
    source: str | None
    origin: str
    time: float

    def without_payload(self) -> Entry:
        """This entry with its payload dropped (its history stays)."""
        return Entry(self.kind, self.key, self.version, b"", self.source, self.origin, self.time)


# -- member -> loader: requests ---------------------------------------------------------


class Fetch(NamedTuple):
    """Give me ``key``; if nobody has it and ``lease`` is set, let me compute it.

    ``holding``: the keys whose fn the asking thread is running, outermost first (the
    loader refuses a wait that would close a cycle: SPEC "get" 4)."""

    rid: int
    kind: str
    key: str
    lease: bool
    holding: tuple[str, ...] = ()


class Await(NamedTuple):
    """A Fetch, with a lease, asked again after a new connection: my request was queued
    behind ``holder``'s lease on ``key`` when the old one ended. While ``holder`` has not
    come back (a loader restarted), wait for it instead of granting me the lease."""

    rid: int
    key: str
    holding: tuple[str, ...]
    holder: str


class Reclaim(NamedTuple):
    """Sent first on a new connection: the leases, ``(key, token)``, whose fn this node
    runs. A loader that restarted meanwhile keeps them for us, so no one else computes."""

    leases: tuple[tuple[str, int], ...]


class Commit(NamedTuple):
    """The value my lease on ``key`` (the one numbered ``token``) computed."""

    rid: int
    key: str
    token: int
    payload: Payload


class Release(NamedTuple):
    """My ``fn`` for ``key`` failed; pass the lease on."""

    rid: int
    key: str
    reason: str


class Put(NamedTuple):
    """Store ``payload`` under ``key`` as a new version."""

    rid: int
    key: str
    payload: Payload


class Define(NamedTuple):
    """Compile ``source`` as function ``name``; ``force`` makes a version even if unchanged."""

    rid: int
    name: str
    source: str
    force: bool


class Delete(NamedTuple):
    rid: int
    kind: str
    key: str


class Sync(NamedTuple):
    """The versions I hold, by (kind, key); send me what changed."""

    rid: int
    versions: dict[tuple[str, str], int]


class Status(NamedTuple):
    rid: int


class History(NamedTuple):
    rid: int
    kind: str
    key: str


class Loaded(NamedTuple):
    """I installed this version (the acknowledgement of a Load)."""

    kind: str
    key: str
    version: int


class NotLoaded(NamedTuple):
    """I could not install this version (it needs what this node lacks): the answer to a
    Load that asks for one, instead of Loaded."""

    kind: str
    key: str
    version: int


# -- loader -> member: answers -------------------------------------------------------------


class Found(NamedTuple):
    rid: int
    entry: Entry


class NotFound(NamedTuple):
    rid: int


class Queued(NamedTuple):
    """Your request is accepted; its answer waits for the lease on its key to settle.

    ``holder`` is the node computing it, for ``held_for`` seconds so far."""

    rid: int
    holder: str = ""
    held_for: float = 0.0


class LeaseGranted(NamedTuple):
    """Nobody has ``key``: run your fn and Commit (or Release) with this lease's ``token``."""

    rid: int
    token: int = 0


class Committed(NamedTuple):
    """The stored entry; when ``mine``, the requester's own value (its payload left out)."""

    rid: int
    entry: Entry
    mine: bool


class Defined(NamedTuple):
    """A definition's outcome: the version, and which nodes have installed it."""

    rid: int
    entry: Entry
    changed: bool
    installed: tuple[str, ...]
    missing: tuple[str, ...]


class Deleted(NamedTuple):
    """``version``: the key's tombstone (its last version when it did not exist)."""

    rid: int
    existed: bool
    version: int = 0


class SyncReply(NamedTuple):
    """What differs from what the member holds: entries, (kind, key, tombstone version) of
    each key it holds that is gone, and big values announced without their payload."""

    rid: int
    entries: tuple[Entry, ...]
    removed: tuple[tuple[str, str, int], ...]
    members: tuple[str, ...]
    announced: tuple[Entry, ...] = ()


class StatusReply(NamedTuple):
    rid: int
    status: dict[str, Any]


class HistoryReply(NamedTuple):
    rid: int
    entries: tuple[Entry, ...]


class Failed(NamedTuple):
    """The request failed; ``error`` names the exception class, ``details`` its fields."""

    rid: int
    error: str
    message: str
    details: dict[str, Any]


# -- loader -> member: pushes -------------------------------------------------------------


class Load(NamedTuple):
    """Install this entry; answer with Loaded when ``ack`` is set."""

    entry: Entry
    ack: bool


class Unload(NamedTuple):
    """``key`` was deleted (by node ``origin``); ``version`` numbers its tombstone."""

    kind: str
    key: str
    version: int
    origin: str


class Members(NamedTuple):
    """Nodes that joined (``present``) and left (``gone``) since the last Members; a
    joining node has the whole list from its SyncReply."""

    present: tuple[str, ...]
    gone: tuple[str, ...]


class Announce(NamedTuple):
    """A new version of a big value (``entry`` without its payload, ``size`` bytes): its
    bytes come on the first ``get`` (SPEC "Big values travel on demand")."""

    entry: Entry
    size: int


class Pushes(NamedTuple):
    """Several pushes in one frame, each an encoded message (see clustorage.fanout)."""

    frames: tuple[bytes, ...]


class SyncEntry(NamedTuple):
    """Part of the answer to a Sync, sent before its SyncReply: install this entry, whatever
    version is held (a big value travels in a frame of its own, not inside the reply)."""

    entry: Entry


Message = (
    Fetch
    | Await
    | Reclaim
    | Commit
    | Release
    | Put
    | Define
    | Delete
    | Sync
    | Status
    | History
    | Loaded
    | NotLoaded
    | Found
    | NotFound
    | LeaseGranted
    | Queued
    | Committed
    | Defined
    | Deleted
    | SyncReply
    | StatusReply
    | HistoryReply
    | Failed
    | Load
    | Unload
    | Members
    | SyncEntry
    | Pushes
    | Announce
)

# Type codes are part of the wire protocol: append, never renumber.
_TYPES: tuple[type, ...] = (
    Entry,
    Fetch,
    Commit,
    Release,
    Put,
    Define,
    Delete,
    Sync,
    Status,
    History,
    Loaded,
    Found,
    NotFound,
    Queued,
    LeaseGranted,
    Committed,
    Defined,
    Deleted,
    SyncReply,
    StatusReply,
    HistoryReply,
    Failed,
    Load,
    Unload,
    Members,
    SyncEntry,
    Pushes,
    Announce,
    NotLoaded,
    Await,
    Reclaim,
)
_CODES: dict[type, int] = {cls: code for code, cls in enumerate(_TYPES)}
_ARITY: tuple[int, ...] = tuple(len(cls._fields) for cls in _TYPES)  # type: ignore[attr-defined]


# A message type's tuple made without its generated __new__ (a Python call): decoding checks
# the number of fields itself.
_new: Callable[..., Any] = tuple.__new__


def _entries(entries: Any) -> tuple[Entry, ...]:
    return tuple(Entry(*entry) for entry in entries)


def _entry_out(entry: Entry) -> tuple[Any, ...]:
    return (*entry[:3], len(entry.payload), *entry[4:])


def _entry_in(fields: Any, blob: Blob) -> Entry:
    kind, key, version, _, source, origin, when = fields
    return _new(Entry, (kind, key, version, blob, source, origin, when))  # type: ignore[no-any-return]


class _Wire(NamedTuple):
    """How a message that carries Entries or a blob is flattened for marshal and rebuilt."""

    flatten: Callable[[Any], tuple[Any, ...]]
    rebuild: Callable[..., Any]  # (blob, *wire fields) -> the message
    blob: Callable[[Any], Payload] | None = None  # what travels after the marshal data
    blob_length: Callable[[tuple[Any, ...]], Any] | None = None  # its length among wire fields


_WIRE: dict[type, _Wire] = {
    Commit: _Wire(
        lambda m: (m.rid, m.key, m.token, len(m.payload)),
        lambda blob, rid, key, token, _: _new(Commit, (rid, key, token, blob)),
        lambda m: m.payload,
        lambda data: data[4],
    ),
    Put: _Wire(
        lambda m: (m.rid, m.key, len(m.payload)),
        lambda blob, rid, key, _: _new(Put, (rid, key, blob)),
        lambda m: m.payload,
        lambda data: data[3],
    ),
    Found: _Wire(
        lambda m: (m.rid, _entry_out(m.entry)),
        lambda blob, rid, entry: _new(Found, (rid, _entry_in(entry, blob))),
        lambda m: m.entry.payload,
        lambda data: data[2][3],
    ),
    Committed: _Wire(
        lambda m: (m.rid, _entry_out(m.entry), m.mine),
        lambda blob, rid, entry, mine: _new(Committed, (rid, _entry_in(entry, blob), mine)),
        lambda m: m.entry.payload,
        lambda data: data[2][3],
    ),
    Load: _Wire(
        lambda m: (_entry_out(m.entry), m.ack),
        lambda blob, entry, ack: _new(Load, (_entry_in(entry, blob), ack)),
        lambda m: m.entry.payload,
        lambda data: data[1][3],
    ),
    SyncEntry: _Wire(
        lambda m: (_entry_out(m.entry),),
        lambda blob, entry: _new(SyncEntry, (_entry_in(entry, blob),)),
        lambda m: m.entry.payload,
        lambda data: data[1][3],
    ),
    Defined: _Wire(
        lambda m: (m.rid, tuple(m.entry), *m[2:]),
        lambda blob, rid, entry, *rest: Defined(rid, Entry(*entry), *rest),
    ),
    SyncReply: _Wire(
        lambda m: (m.rid, tuple(map(tuple, m.entries)), *m[2:4], tuple(map(tuple, m.announced))),
        lambda blob, rid, entries, removed, members, announced: SyncReply(
            rid, _entries(entries), removed, members, _entries(announced)
        ),
    ),
    Announce: _Wire(
        lambda m: (tuple(m.entry), m.size),
        lambda blob, entry, size: Announce(Entry(*entry), size),
    ),
    HistoryReply: _Wire(
        lambda m: (m.rid, tuple(map(tuple, m.entries))),
        lambda blob, rid, entries: HistoryReply(rid, _entries(entries)),
    ),
}


def encode_parts(message: Message | Entry) -> tuple[bytes, Payload]:
    """One message as its marshal data and its blob (``b""`` if it carries none)."""
    cls = type(message)
    wire = _WIRE.get(cls)
    if wire is None:
        return marshal.dumps((_CODES[cls], *message)), b""
    blob = b"" if wire.blob is None else wire.blob(message)
    return marshal.dumps((_CODES[cls], *wire.flatten(message))), blob


def encode(message: Message | Entry) -> bytes:
    """The payload bytes of one message."""
    envelope, blob = encode_parts(message)
    return envelope + joined(blob) if blob else envelope


def decode(payload: Blob) -> Message:
    """One message from payload bytes; only message types are ever constructed.

    A blob comes out as a view of ``payload`` (no copy).

    Raises:
        RemoteProtocolError: the payload is not a message.
    """
    try:
        data = marshal.loads(payload)
    except (ValueError, EOFError, TypeError) as exc:
        raise RemoteProtocolError(f"a frame did not hold a message: {exc}") from exc
    if type(data) is not tuple or not data or type(data[0]) is not int:
        raise RemoteProtocolError(f"a frame held a {type(data).__name__}, not a message")
    code = data[0]
    if not 0 <= code < len(_TYPES) or len(data) - 1 != _ARITY[code]:
        raise RemoteProtocolError(
            f"a frame held type code {code} with {len(data) - 1} fields, not a message"
        )
    cls = _TYPES[code]
    wire = _WIRE.get(cls)
    try:
        if wire is None:  # the arity is checked: build the tuple without its __new__
            return tuple.__new__(cls, data[1:])
        blob: Blob = b""
        if wire.blob_length is not None:
            length = wire.blob_length(data)
            if type(length) is not int or not 0 <= length <= len(payload):
                raise TypeError(f"a blob of {length!r} bytes in a payload of {len(payload)}")
            blob = payload[len(payload) - length :]
        return wire.rebuild(blob, *data[1:])  # type: ignore[no-any-return]
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise RemoteProtocolError(f"a frame held a malformed {cls.__name__}: {exc}") from exc
