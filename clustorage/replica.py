"""A node's local copy of every value and function, and its on_load listeners. No I/O.

Reads (``values[key]``, ``functions[name]``) take no lock: entries are only ever replaced
whole, under the replica's lock, and a dict assignment is atomic.

Convergence (SPEC "Replicas converge"): the loader numbers every change of a key, a deletion
included (a tombstone). A change applies only over an older one, so a key's state is that of
the highest version seen, whatever order answers (on callers' threads) and pushes (on the
reader's) arrive in. ``epoch`` counts loaders on other stores, whose numbers mean nothing
here: a change read under an earlier epoch is ignored.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from . import codec
from .compiler import register_source, restore_filename
from .messages import FUNCTION, VALUE, Entry

__all__ = ["MISSING", "LoadEvent", "Replica"]

MISSING: Any = object()  # "no object given": None is a value like any other

log = logging.getLogger(__name__)


# Functions loaded in this process, by name and payload: the Node objects of one process
# (a hundred of them, say) that receive one definition load it once and share it. Each
# still installs it, and acknowledges it, itself.
_SHARED_LIMIT = 64 << 10  # bytes of payload above which a function is not kept here
_SHARED_COUNT = 256
_shared_functions: dict[tuple[str, bytes], Any] = {}
_shared_lock = threading.Lock()


def _load_function(entry: Entry) -> Any:
    """``entry``'s function, as loaded (and pointed at its source) in this process before,
    or loaded now."""
    payload = entry.payload
    if type(payload) is not bytes or len(payload) > _SHARED_LIMIT:
        return restore_filename(entry.key, codec.load(payload))
    where = (entry.key, payload)
    function = _shared_functions.get(where)
    if function is None:
        function = restore_filename(entry.key, codec.load(payload))
        with _shared_lock:
            if len(_shared_functions) >= _SHARED_COUNT:  # the oldest goes
                del _shared_functions[next(iter(_shared_functions))]
            _shared_functions[where] = function
    return function


def _cannot_load(entry: Entry) -> str:
    return (
        f"the {entry.kind} {entry.key!r} (version {entry.version}, from {entry.origin}) "
        f"cannot be loaded on this node; install here what it needs"
    )


class LoadEvent(NamedTuple):
    """What an on_load listener is told: an entry was installed (or removed, ``obj`` None)."""

    kind: str
    key: str
    version: int
    origin: str
    obj: Any
    source: str | None
    removed: bool = False


Listener = Callable[[LoadEvent], None]


class Replica:
    """Values and functions by key, with the version of each."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.functions: dict[str, Callable[..., Any]] = {}
        self.sources: dict[str, str] = {}
        self.versions: dict[tuple[str, str], int] = {}
        self.tombstones: dict[tuple[str, str], int] = {}  # deleted keys' last versions
        self.epoch = 0
        self.origins: dict[tuple[str, str], str] = {}
        # Values recorded but not deserialized yet, by key (see install's ``lazy``).
        self._unread: dict[str, Entry] = {}
        # Big values announced, whose bytes are fetched on first read (see announce).
        self._announced: dict[str, Entry] = {}
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    def on_load(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` on every install and removal; returns a function that unsubscribes."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def version(self, kind: str, key: str) -> int:
        return self.versions.get((kind, key), 0)

    def forget_versions(self) -> dict[tuple[str, str], int]:
        """Mark every held version unknown (0), values kept, so that any version installs
        over it, and forget tombstones; returns what is held, by (kind, key). For a loader
        on another store, which numbers its versions afresh: changes read under the old
        numbering (an earlier ``epoch``) are ignored from now on."""
        with self._lock:
            self.epoch += 1
            self.versions = dict.fromkeys(self.versions, 0)
            self.tombstones.clear()
            return dict(self.versions)

    def held(self) -> dict[tuple[str, str], int]:
        """Every version held, tombstones included: what a resync compares."""
        with self._lock:
            return {**self.tombstones, **self.versions}

    def install(
        self,
        entry: Entry,
        obj: Any = MISSING,
        *,
        force: bool = False,
        lazy: bool = False,
        epoch: int | None = None,
    ) -> bool:
        """Install ``entry`` unless this or a newer version (or tombstone) is here; returns
        whether it was.

        ``obj`` is the already-deserialized object, when the caller has it. ``force``
        installs any version other than the one held (the loader's word is final on resync).
        ``lazy``: a value nobody listens for is only recorded, not deserialized until
        :meth:`read_unread` (or an install of the same version) asks for it. The loader's
        own node does this. ``epoch``: the replica's epoch when the entry was asked for.
        """
        with self._lock:
            if epoch is not None and epoch != self.epoch:
                return False
            where = (entry.kind, entry.key)
            held = self.versions.get(where, 0)
            unread = entry.kind == VALUE and (
                entry.key in self._unread or entry.key in self._announced
            )
            if (held == entry.version and not unread) or (held > entry.version and not force):
                return False
            if not force and self.tombstones.get(where, 0) >= entry.version:
                return False
            self.tombstones.pop(where, None)
            if entry.kind == VALUE:
                self._announced.pop(entry.key, None)
            if lazy and obj is MISSING and entry.kind == VALUE and not self._listeners:
                self._record_unread(entry)
                return True
            if unread:
                self._unread.pop(entry.key, None)
            if obj is MISSING:
                try:
                    if entry.kind == FUNCTION:
                        obj = _load_function(entry)
                    else:
                        obj = codec.load(entry.payload)
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # whatever unpickling raises, SystemExit too
                    return self._unloadable(entry, exc)
            elif entry.kind == FUNCTION:
                obj = restore_filename(entry.key, obj)
            if entry.kind == FUNCTION:
                if entry.source is not None:
                    register_source(entry.key, entry.source)
                    self.sources[entry.key] = entry.source
                self.functions[entry.key] = obj
            else:
                self.values[entry.key] = obj
            self.versions[(entry.kind, entry.key)] = entry.version
            self.origins[(entry.kind, entry.key)] = entry.origin
            listeners = list(self._listeners)
        if listeners:
            self._notify(
                listeners,
                LoadEvent(entry.kind, entry.key, entry.version, entry.origin, obj, entry.source),
            )
        return True

    def announce(self, entry: Entry, *, force: bool = False) -> bool:
        """Record a version of a big value without its bytes (``entry`` has no payload):
        the value held before is dropped, and reading the key fetches it from the loader
        (SPEC "Big values travel on demand"). ``force`` as for :meth:`install`."""
        with self._lock:
            where = (VALUE, entry.key)
            held = max(self.versions.get(where, 0), self.tombstones.get(where, 0))
            if held == entry.version or (held > entry.version and not force):
                return False
            self.tombstones.pop(where, None)
            self.values.pop(entry.key, None)
            self._unread.pop(entry.key, None)
            self._announced[entry.key] = entry
            self.versions[where] = entry.version
            self.origins[where] = entry.origin
        return True

    def announced(self, key: str) -> bool:
        """Whether ``key``'s current version is known here without its bytes."""
        return key in self._announced

    def remove(
        self,
        kind: str,
        key: str,
        version: int,
        origin: str = "",
        *,
        force: bool = False,
        epoch: int | None = None,
    ) -> bool:
        """Record that ``key`` was deleted (by node ``origin``) as tombstone ``version``, and
        forget what is held unless it is newer; returns whether anything was forgotten.

        ``force``: forget it whatever its version (the loader's word is final on resync).
        """
        with self._lock:
            if epoch is not None and epoch != self.epoch:
                return False
            where = (kind, key)
            if not force and max(self.versions.get(where, 0), self.tombstones.get(where, 0)) > (
                version
            ):
                return False
            self.tombstones[where] = max(version, self.tombstones.get(where, 0))
            existed = key in (self.functions if kind == FUNCTION else self.values)
            held = where in self.versions  # at version 0 after forget_versions
            held_version, held_origin = self._forget(kind, key)
            origin = origin or held_origin
            listeners = list(self._listeners)
        if held:
            self._notify(listeners, LoadEvent(kind, key, held_version, origin, None, None, True))
        return existed or held

    def read_unread(self, key: str) -> Any:
        """Deserialize and install the recorded value of ``key``; MISSING if there is none."""
        if key not in self._unread:  # the common case, without the lock
            return MISSING
        with self._lock:
            entry = self._unread.get(key)
            if entry is None:
                return MISSING
            try:
                obj = codec.load(entry.payload)
            except Exception as exc:
                exc.add_note(_cannot_load(entry))
                raise
            except (SystemExit, GeneratorExit) as exc:  # not this process's to end
                raise RuntimeError(
                    f"{_cannot_load(entry)}: loading it raised {type(exc).__name__}({exc})"
                ) from exc
            del self._unread[key]
            self.values[key] = obj
            return obj

    def _forget(self, kind: str, key: str) -> tuple[int, str]:
        """Drop ``key`` (the lock held); the version and origin it had."""
        if kind == FUNCTION:
            self.functions.pop(key, None)
            self.sources.pop(key, None)
        else:
            self.values.pop(key, None)
            self._unread.pop(key, None)
            self._announced.pop(key, None)
        return self.versions.pop((kind, key), 0), self.origins.pop((kind, key), "")

    def _record_unread(self, entry: Entry) -> None:
        self.values.pop(entry.key, None)
        self._unread[entry.key] = entry
        self.versions[(entry.kind, entry.key)] = entry.version
        self.origins[(entry.kind, entry.key)] = entry.origin

    def _unloadable(self, entry: Entry, exc: BaseException) -> bool:
        """A pushed entry that cannot be deserialized here (a module this node lacks...): a
        value is recorded, and reading it raises, on the reader's thread; a function is
        left out. Either way the node goes on taking changes."""
        log.warning("%s (%s: %s)", _cannot_load(entry), type(exc).__name__, exc)
        if entry.kind != VALUE:  # not the older version either: a call asks the loader, and
            self._forget(entry.kind, entry.key)  # raises there what loading it raises
            return False
        self._record_unread(entry)
        return True

    def keys(self) -> list[str]:
        """Every value key, sorted (unread and announced ones too)."""
        with self._lock:
            return sorted([*self.values, *self._unread, *self._announced])

    def function_names(self) -> list[str]:
        return sorted(self.functions)

    @staticmethod
    def _notify(listeners: list[Listener], event: LoadEvent) -> None:
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                log.exception("an on_load listener failed on %s %r", event.kind, event.key)
