"""What a node's two ways to the loader (in-process, over TCP) have in common.

A request gets a number (``rid``) and a :class:`Waiter`; the answer with that number wakes
the caller. Pushes from the loader are applied to the replica by :func:`apply_push`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from .errors import (
    AuthenticationError,
    ClustorageError,
    CompileError,
    ConfigError,
    DeadlockError,
    LeaseLost,
    LoaderUnavailable,
    NameClashError,
    NotFound,
    RemoteError,
    StoreError,
    ValueTooLarge,
)
from .messages import (
    Announce,
    Committed,
    Entry,
    Failed,
    Load,
    Loaded,
    Members,
    Message,
    NotLoaded,
    Queued,
    SyncEntry,
    SyncReply,
    Unload,
)
from .replica import Replica

__all__ = [
    "SLICE",
    "Channel",
    "CutOff",
    "Pending",
    "Roster",
    "Waiter",
    "acknowledgement",
    "apply_push",
    "apply_sync",
    "raise_failure",
    "record_late_write",
    "wait_sliced",
]

log = logging.getLogger(__name__)

SLICE = 0.25  # seconds: how often a waiting caller may be interrupted (a Ctrl-C held back)

Build = Callable[[int], Message]


class Channel(Protocol):
    """How a Node talks to its loader."""

    pending: Pending

    @property
    def members(self) -> tuple[str, ...]: ...

    @property
    def connected(self) -> bool: ...

    @property
    def last_error(self) -> str:
        """Why the loader could not be reached the last time it was tried ("" if it was)."""
        ...

    def request(self, build: Build, timeout: float, patient: bool = False) -> Message:
        """Send ``build(rid)`` and wait for its answer.

        A ``patient`` request (like a Queued one) waits as long as the connection lives.
        """
        ...

    def notify(self, build: Build) -> None: ...

    def close(self) -> None: ...


class CutOff(LoaderUnavailable):
    """The connection ended while the request waited for its answer (behind ``holder``'s
    lease, if named): a get asks again once connected (then with an Await naming the
    holder), rather than give up on a value that may still be computed."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


class Waiter:
    """One caller waiting for one answer; ``holder``: whose lease it is queued behind."""

    __slots__ = ("_lock", "done", "error", "holder", "queued", "reply")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.reply: Message | None = None
        self.error: BaseException | None = None
        self.queued = False
        self.holder = ""
        self.done = False

    def set(self, reply: Message | None = None, error: BaseException | None = None) -> None:
        self.reply, self.error = reply, error
        self.done = True
        self._lock.release()

    def wait(self, timeout: float) -> bool:
        return self._lock.acquire(timeout=timeout)


def wait_sliced(
    wait: Callable[[float], bool], timeout: float, safe_point: Callable[[], None] | None
) -> bool:
    """``wait(timeout)`` (true once what it waits for came), calling ``safe_point()`` every
    SLICE seconds meanwhile."""
    if safe_point is None:
        return wait(timeout)
    deadline = time.monotonic() + timeout
    while not wait(min(max(deadline - time.monotonic(), 0.0), SLICE)):
        if time.monotonic() >= deadline:
            return False
        safe_point()
    return True


def record_late_write(replica: Replica, answer: Message) -> None:
    """A write answered after its caller stopped waiting: its node applies it all the same,
    for the fan-out leaves the writer out. A value's bytes come on the next get."""
    if type(answer) is Committed:
        replica.announce(answer.entry._replace(payload=b""))


class Pending:
    """Requests waiting for answers, by number; ``queued``: those queued on a lease held
    elsewhere, with the holder's name and since when it computes (``time.time()``)."""

    def __init__(self) -> None:
        self._numbers = itertools.count(1)
        self._waiters: dict[int, Waiter] = {}
        self._lock = threading.Lock()
        self.queued: dict[int, tuple[str, float]] = {}

    def note_queued(self, rid: int, message: Queued) -> None:
        self.queued[rid] = (message.holder, time.time() - message.held_for)

    def open(self, patient: bool = False) -> tuple[int, Waiter]:
        waiter = Waiter()
        waiter.queued = patient
        with self._lock:
            rid = next(self._numbers)
            self._waiters[rid] = waiter
        return rid, waiter

    def number(self) -> int:
        """A fresh request number, for a request that needs no Waiter."""
        return next(self._numbers)  # itertools.count is atomic: no lock needed

    def busy(self) -> bool:
        """Whether any request is waiting for its answer."""
        return bool(self._waiters)

    def discard(self, rid: int) -> bool:
        """Stop waiting for ``rid``'s answer; False if it was already being handed over."""
        with self._lock:
            found = self._waiters.pop(rid, None)
        self.queued.pop(rid, None)
        return found is not None

    def resolve(self, rid: int, reply: Message) -> bool:
        """Hand ``reply`` to its waiter; False if its caller gave up waiting."""
        if type(reply) is Queued:
            with self._lock:  # not noted after take_all took its waiter
                waiter = self._waiters.get(rid)
                if waiter is not None:
                    waiter.queued, waiter.holder = True, reply.holder
                    self.note_queued(rid, reply)
            return waiter is not None
        self.queued.pop(rid, None)
        with self._lock:  # set inside: a caller that cannot discard it finds it done
            found = self._waiters.pop(rid, None)
            if found is not None:
                found.set(reply)
        if found is None:
            log.debug("an answer to request %d came after its caller gave up", rid)
            return False
        return True

    def fail_all(self, error: BaseException) -> None:
        for waiter in self.take_all():
            waiter.set(error=error)

    def take_all(self) -> list[Waiter]:
        """The waiters of every request open now, no longer waited for here: those of a
        connection that ends, taken as it ends (one opened after is the next one's)."""
        with self._lock:
            waiters, self._waiters = self._waiters, {}
        for rid in waiters:
            self.queued.pop(rid, None)
        return list(waiters.values())

    def wait(
        self,
        rid: int,
        waiter: Waiter,
        timeout: float,
        alive: Callable[[], bool],
        whole: float | None = None,
        arriving: Callable[[], bool] | None = None,
        safe_point: Callable[[], None] | None = None,
    ) -> Message:
        """The answer to ``rid``. A queued request waits as long as the connection lives.

        ``timeout`` may be what is left of the caller's ``whole`` timeout. While
        ``arriving()`` says a big payload came further, which the answer comes after, the
        wait starts again. ``safe_point()`` is called every quarter of a second meanwhile
        (it may raise: a Ctrl-C held back, see clustorage.interrupts).

        Raises:
            LoaderUnavailable: no answer in ``timeout`` seconds, or the connection was lost.
        """
        while not wait_sliced(waiter.wait, timeout, safe_point):
            if arriving is not None and arriving() and alive():
                timeout = whole if whole is not None else timeout
            elif not (waiter.queued and alive()):
                self.discard(rid)
                said = whole if whole is not None else timeout
                raise LoaderUnavailable(f"no answer from the loader within {said:g}s")
            timeout = max(timeout, 0.25)  # queued: check on the connection now and then
        if waiter.error is not None:
            raise waiter.error
        assert waiter.reply is not None
        if type(waiter.reply) is Failed:
            raise_failure(waiter.reply)
        return waiter.reply


_ERRORS: dict[str, type[ClustorageError]] = {
    cls.__name__: cls
    for cls in (
        AuthenticationError,
        ConfigError,
        DeadlockError,
        NameClashError,
        LeaseLost,
        LoaderUnavailable,
        NotFound,
        StoreError,
        ValueTooLarge,
    )
}


def raise_failure(failed: Failed) -> None:
    """Raise the error a Failed answer carries, as the class the caller can catch."""
    if failed.error == "CompileError":
        details = failed.details
        raise CompileError(
            failed.message,
            name=details["name"],
            lineno=details.get("lineno"),
            offset=details.get("offset"),
            text=details.get("text"),
        )
    if failed.error == "TypeError":
        raise TypeError(failed.message)
    if failed.error == "ValueError":
        raise ValueError(failed.message)
    cls = _ERRORS.get(failed.error, RemoteError)
    prefix = "" if cls is not RemoteError else f"{failed.error}: "
    raise cls(prefix + failed.message)


def apply_push(replica: Replica, message: Message) -> bool:
    """Apply a push from the loader; returns whether the membership changed."""
    if type(message) is Load:
        replica.install(message.entry)
    elif type(message) is SyncEntry:  # the loader's word is final on resync
        replica.install(message.entry, force=True)
    elif type(message) is Announce:
        replica.announce(message.entry)
    elif type(message) is Unload:
        replica.remove(message.kind, message.key, message.version, message.origin)
    elif type(message) is Members:
        return True
    return False


def acknowledgement(replica: Replica, entry: Entry) -> Loaded | NotLoaded:
    """The answer to a definition pushed with ``ack``, once applied: Loaded if ``replica``
    holds that version (or a newer one), else NotLoaded (it could not be loaded here)."""
    held = replica.version(entry.kind, entry.key) >= entry.version
    return (Loaded if held else NotLoaded)(entry.kind, entry.key, entry.version)


def apply_sync(replica: Replica, reply: SyncReply) -> None:
    """Make the replica what the loader says it should be (the loader is the truth)."""
    for entry in reply.entries:
        replica.install(entry, force=True)
    for entry in reply.announced:
        replica.announce(entry, force=True)
    for kind, key, version in reply.removed:
        replica.remove(kind, key, version, force=True)


class Roster:
    """The names of the nodes a member knows of, the loader first and the others in order.

    The ordered tuple is made when asked for, not on every change: a thousand nodes joining
    are a thousand changes to each of them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loader = ""
        self._others: set[str] = set()
        self._names: tuple[str, ...] | None = ()

    def reset(self, names: tuple[str, ...]) -> None:
        """The loader (first) and the others, as a resync or a welcome says; () when
        disconnected."""
        with self._lock:
            self._loader = names[0] if names else ""
            self._others = set(names[1:])
            self._others.discard(self._loader)
            self._names = None

    def merge(self, news: Members) -> None:
        """Add who joined, drop who left (nothing while disconnected)."""
        with self._lock:
            if not self._loader:
                return
            self._others.update(news.present)
            self._others.difference_update(news.gone)
            self._others.discard(self._loader)
            self._names = None

    def names(self) -> tuple[str, ...]:
        with self._lock:
            if self._names is None:
                self._names = (self._loader, *sorted(self._others)) if self._loader else ()
            return self._names
