"""The messages members and the loader exchange, one immutable tuple type each.

Requests carry ``rid``, a number the requester chose; the answer carries the same ``rid``.
Pushes (Load, Unload, Members) flow from the loader unasked. Values and functions travel as
cloudpickle bytes inside an :class:`Entry`; this module never unpickles them.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, NamedTuple

from .errors import RemoteProtocolError

__all__ = [
    "FUNCTION",
    "VALUE",
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
    "History",
    "HistoryReply",
    "LeaseGranted",
    "Load",
    "Loaded",
    "Members",
    "Message",
    "NotFound",
    "Put",
    "Queued",
    "Release",
    "Status",
    "StatusReply",
    "Sync",
    "SyncReply",
    "Unload",
    "decode",
    "encode",
]

VALUE = "value"
FUNCTION = "function"


class Entry(NamedTuple):
    """One version of a value or function, as stored and as sent."""

    kind: str
    key: str
    version: int
    payload: bytes
    source: str | None
    origin: str
    time: float


# -- member -> loader: requests ---------------------------------------------------------


class Fetch(NamedTuple):
    """Give me ``key``; if nobody has it and ``lease`` is set, let me compute it."""

    rid: int
    kind: str
    key: str
    lease: bool


class Commit(NamedTuple):
    """The value my lease on ``key`` computed."""

    rid: int
    key: str
    payload: bytes


class Release(NamedTuple):
    """My ``fn`` for ``key`` failed; pass the lease on."""

    rid: int
    key: str
    reason: str


class Put(NamedTuple):
    """Store ``payload`` under ``key`` as a new version."""

    rid: int
    key: str
    payload: bytes


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


# -- loader -> member: answers -------------------------------------------------------------


class Found(NamedTuple):
    rid: int
    entry: Entry


class NotFound(NamedTuple):
    rid: int


class Queued(NamedTuple):
    """Your request is accepted; its answer waits for the lease on its key to settle."""

    rid: int


class LeaseGranted(NamedTuple):
    """Nobody has ``key``: run your fn and Commit (or Release)."""

    rid: int


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
    rid: int
    existed: bool


class SyncReply(NamedTuple):
    rid: int
    entries: tuple[Entry, ...]
    removed: tuple[tuple[str, str], ...]
    members: tuple[str, ...]


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
    """``key`` was deleted (by node ``origin``)."""

    kind: str
    key: str
    origin: str


class Members(NamedTuple):
    """The names of the nodes now connected (the loader first)."""

    names: tuple[str, ...]


Message = (
    Fetch
    | Commit
    | Release
    | Put
    | Define
    | Delete
    | Sync
    | Status
    | History
    | Loaded
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
)

_ALLOWED = {name: globals()[name] for name in __all__ if name[0].isupper() and name != "Message"}
_ALLOWED.pop("FUNCTION")
_ALLOWED.pop("VALUE")


class _MessageUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name in _ALLOWED:
            return _ALLOWED[name]
        raise RemoteProtocolError(f"a message referred to {module}.{name}, which is not a message")


def encode(message: Message) -> bytes:
    """The payload bytes of one message."""
    return pickle.dumps(message, protocol=5)


def decode(payload: bytes) -> Message:
    """One message from payload bytes; only message types are ever constructed.

    Raises:
        RemoteProtocolError: the payload is not a message.
    """
    try:
        message = _MessageUnpickler(io.BytesIO(payload)).load()
    except RemoteProtocolError:
        raise
    except Exception as exc:
        raise RemoteProtocolError(f"a frame did not hold a message: {exc}") from exc
    if type(message) not in _ALLOWED.values():
        raise RemoteProtocolError(f"a frame held a {type(message).__name__}, not a message")
    return message  # type: ignore[no-any-return]
