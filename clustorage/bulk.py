"""The machinery that moves big blobs: digests, hashing threads and receive buffers.

The wire protocol (``protocol``) says what a bulk frame is; this module holds what it takes
to move one fast, which a pure protocol object cannot be: threads, mapped memory, a cache.

- Bulk digests. A blob of ``protocol.BULK`` bytes or more is hashed with the bulk digest the
  server chose for the connection: the fastest on its CPU (:func:`bulk_digests_by_speed`) of
  those the client has (BLAKE3 where the blake3 package is installed, several times faster
  than the others; else SHA-256 on a CPU with SHA extensions).
- Receive buffers. A bulk frame arrives into its own anonymous mmap (:class:`ArrivingFrame`),
  its pages mapped ahead of the bytes arriving (all at once up front where it trusts the
  sender), in huge pages while they are cheap (:mod:`clustorage.fresh_memory`); its blob is
  hashed as its bytes come in. A big frame of the size of a recent one arrives into that
  one's buffer once nothing uses it any more (:class:`RecycledBuffers`), not into fresh
  memory the kernel must zero.
- Hashing threads. A blob of ``THREAD_HASH_AT`` bytes or more is hashed on a thread of its
  own, beside the one receiving or sending it, so that moving and hashing overlap; the
  thread ends with its frame, or as soon as the frame will not finish.
- Verified digests. The digests of the last few blobs this process verified
  (:data:`VERIFIED`), so that the loader forwards a blob without hashing it again.
- Spilled blobs. A loader that keeps big payloads in files has a big blob written to a new
  file while it arrives (a :class:`Spill`, which writes on a thread of its own); once the
  frame is verified, :data:`SPILLED` hands that file to the store, which renames it into
  place instead of writing the payload after it arrived.

Inside TLS a blob is not hashed at all: TLS checks every record, so a bulk frame arriving
there has a hash state that does nothing.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import mmap
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from .errors import LocalProtocolError
from .fresh_memory import FreshMemory
from .messages import Blob

try:
    import blake3

    _BLAKE3: tuple[str, ...] = ("blake3",)
except ImportError:  # not installed here (PyPy, a platform without a wheel): stdlib digests remain
    _BLAKE3 = ()

__all__ = [
    "BASELINE_DIGEST",
    "BULK_DIGESTS",
    "HASHING_THREADS",
    "OWNED",
    "OWNED_AT",
    "RECYCLED",
    "RECYCLE_AT",
    "RECYCLE_IDLE",
    "SPILLED",
    "THREAD_HASH_AT",
    "VERIFIED",
    "ArrivingFrame",
    "OwnedBlobs",
    "RecycledBuffers",
    "Spill",
    "SpilledBlobs",
    "Spiller",
    "VerifiedDigests",
    "abandon_hashing",
    "bulk_digests_by_speed",
    "new_hasher",
    "sending_hasher",
]

T = TypeVar("T")

BASELINE_DIGEST = "blake2b"  # every node has it
BULK_DIGESTS = (*_BLAKE3, BASELINE_DIGEST, "sha256")


def new_hasher(algorithm: str) -> Any:
    """A fresh hash state of the bulk digest ``algorithm``."""
    if algorithm == "blake3":
        return blake3.blake3()
    return hashlib.sha256() if algorithm == "sha256" else hashlib.blake2b(digest_size=32)


@functools.cache
def bulk_digests_by_speed() -> tuple[str, ...]:
    """The bulk digests of this process, fastest on this CPU first (measured once, in a few
    milliseconds)."""
    sample = bytes(1 << 20)
    timings = {}
    for algorithm in BULK_DIGESTS:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            new_hasher(algorithm).update(sample)
            best = min(best, time.perf_counter() - start)
        timings[algorithm] = best
    return tuple(sorted(BULK_DIGESTS, key=timings.__getitem__))


class _ByBuffer(Generic[T]):
    """What is known of the last few buffers (receive buffers, files mapped back), by the
    buffer, without keeping them alive. A received blob is the tail of a buffer nobody
    writes to after it is handed over, so a blob of the length known is that tail. (No
    weakref callbacks: one can run inside ``_put``, from a garbage collection, under the
    lock.)"""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._known: dict[int, tuple[weakref.ref[Any], int, T]] = {}

    def _put(self, owner: Any, length: int, value: T) -> list[T]:
        """Know ``value`` of the last ``length`` bytes of ``owner``; the values this pushed
        out (the owner's earlier one, the oldest ones past ``size``)."""
        with self._lock:
            out = [self._known.pop(id(owner), None)]
            self._known[id(owner)] = (weakref.ref(owner), length, value)
            while len(self._known) > self._size:
                out.append(self._known.pop(next(iter(self._known))))
        return [known[2] for known in out if known is not None]

    def _get(self, blob: Blob, take: bool = False) -> T | None:
        """What is known of ``blob``'s buffer, if ``blob`` is its known tail (``take``:
        forgotten as it is returned)."""
        owner = blob.obj if isinstance(blob, memoryview) else blob
        with self._lock:
            known = self._known.get(id(owner))
            if known is None or known[0]() is not owner or known[1] != len(blob):
                return None
            if take:
                del self._known[id(owner)]
        return known[2]

    def _drop(self, owner: Any) -> list[T]:
        """Forget ``owner``; what was known of it."""
        with self._lock:
            known = self._known.pop(id(owner), None)
        return [] if known is None else [known[2]]


class VerifiedDigests(_ByBuffer[tuple[str, bytes]]):
    """Digests of blobs this process verified, so that forwarding one does not hash it again."""

    def __init__(self, size: int = 2) -> None:
        super().__init__(size)

    def remember(self, owner: Any, length: int, algorithm: str, digest: bytes) -> None:
        self._put(owner, length, (algorithm, digest))

    def forget(self, owner: Any) -> None:
        """``owner`` is about to hold other bytes (a receive buffer used again)."""
        self._drop(owner)

    def carry(self, blob: bytes | memoryview, copy: bytes | memoryview) -> None:
        """``copy`` holds the same bytes as ``blob`` (a blob written to a file and mapped
        back): forwarding it needs no hashing either, if ``blob`` was verified."""
        known = self._get(blob)
        if known is not None and len(copy) == len(blob):
            self.remember(copy.obj if isinstance(copy, memoryview) else copy, len(blob), *known)

    def find(self, blob: bytes | memoryview, algorithm: str) -> bytes | None:
        known = self._get(blob)
        return known[1] if known is not None and known[0] == algorithm else None


VERIFIED = VerifiedDigests()


class Spill(Protocol):
    """Where a big blob is written while it arrives (a loader's new file for it). None of
    its methods raises, and only :meth:`finish` waits: the loop thread gives it the parts
    and may discard it. A failure (a full disk) is kept: the blob is then not spilled, and
    whoever stores it writes it the usual way."""

    def write(self, part: memoryview) -> None:
        """Append ``part`` (written meanwhile, elsewhere; do not change it)."""

    def finish(self) -> bool:
        """Every part is given: wait until they are written; whether the spill holds the
        whole blob."""

    def discard(self) -> None:
        """Nobody will use the spill: remove what was written."""


Spiller = Callable[[int], Spill | None]  # a spill for a blob of this many bytes, or None


class SpilledBlobs(_ByBuffer[Spill]):
    """The spills of the last few verified blobs, by the buffer each arrived into, until
    the store takes one (:meth:`take`). A spill nobody takes is discarded when its buffer
    receives another frame, at :meth:`sweep` once its buffer is gone, or when a newer one
    pushes it out (``size``: more than a loader keeps open, see ``blobs.ArrivingFile``)."""

    def __init__(self, size: int = 16) -> None:
        super().__init__(size)

    def remember(self, owner: Any, length: int, spill: Spill) -> None:
        """``spill`` holds the last ``length`` bytes of ``owner``, a verified frame's buffer."""
        for out in self._put(owner, length, spill):
            out.discard()

    def take(self, blob: Blob) -> Spill | None:
        """The spill of ``blob``, if it is a verified frame's blob that was spilled whole;
        the caller then owns it (and discards it if unused)."""
        return self._get(blob, take=True)

    def forget(self, owner: Any) -> None:
        """``owner`` is about to hold other bytes (a receive buffer used again)."""
        for spill in self._drop(owner):
            spill.discard()

    def sweep(self) -> None:
        """Discard the spills whose buffers are gone (their values were not stored)."""
        with self._lock:
            dead = [key for key, known in self._known.items() if known[0]() is None]
            spills = [self._known.pop(key)[2] for key in dead]
        for spill in spills:
            spill.discard()


SPILLED = SpilledBlobs()


class OwnedBlobs(_ByBuffer[bool]):
    """Verified blobs a member received into fresh memory, which only the one reader of the
    answer will read: :func:`bigbytes.copy_to_bytes` may give their pages back as it copies
    them out, so that the value's new pages are ones the system has just had in use. (On a
    virtual machine, memory a process has not touched before can cost several times a copy
    to fault in: the host backs it too.)"""

    def __init__(self, size: int = 4) -> None:
        super().__init__(size)

    def remember(self, owner: Any, length: int, huge_pages: bool) -> None:
        """``huge_pages``: whether they were cheap when its buffer was mapped."""
        self._put(owner, length, huge_pages)

    def take(self, blob: Blob) -> bool | None:
        """None unless ``blob`` is such a blob (it is one no more: it is read once); else
        whether huge pages were cheap when its buffer was mapped."""
        return self._get(blob, take=True)

    def forget(self, owner: Any) -> None:
        """``owner`` is about to hold other bytes (a receive buffer used again)."""
        self._drop(owner)


OWNED = OwnedBlobs()
OWNED_AT = 1 << 23  # bytes: the blobs worth taking apart (bigbytes.COPY_AT)


def _discard_spill(holder: list[Spill | None]) -> None:
    spill, holder[0] = holder[0], None
    if spill is not None:
        spill.discard()


class _NoHash:
    """The hash of a blob inside TLS, which needs none (TLS checks every record)."""

    def update(self, data: memoryview) -> None:
        pass

    def copy(self) -> _NoHash:
        return self


_NO_HASH = _NoHash()


# A blob from this size on is hashed on a thread of its own while its bytes arrive, so that
# receiving and hashing overlap; with HASHING_THREADS such threads running in this process
# already, a frame is hashed inline.
THREAD_HASH_AT = 1 << 22
HASHING_THREADS = 2
_HASHING = "clustorage-hash"


class _HashingThread:
    """A hash state updated on a thread of its own, for one blob that is arriving.

    Its thread ends at :meth:`digest`, or at :meth:`abandon` when the frame will not finish
    (the connection failed or was dropped, or the frame was collected unfinished).
    """

    def __init__(self, algorithm: str) -> None:
        self._hasher = new_hasher(algorithm)
        self._parts: queue.SimpleQueue[memoryview | threading.Event | None] = queue.SimpleQueue()
        self._failure: BaseException | None = None
        self._abandoned = False
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name=_HASHING, daemon=True)

    @staticmethod
    def available() -> bool:
        """Whether fewer than HASHING_THREADS hashing threads run in this process."""
        running = sum(thread.name == _HASHING for thread in threading.enumerate())
        return running < HASHING_THREADS

    def start(self) -> bool:
        """Start the thread; False when no thread could be had (then hash inline)."""
        try:
            self._thread.start()
        except RuntimeError:
            return False
        return True

    def _run(self) -> None:
        while (part := self._parts.get()) is not None:
            if isinstance(part, threading.Event):
                part.set()
            elif self._failure is None and not self._abandoned:
                try:
                    self._hasher.update(part)
                except BaseException as exc:  # re-raised by digest(), on the caller's thread
                    self._failure = exc

    def update(self, part: memoryview) -> None:
        self._parts.put(part)

    def abandon(self) -> None:
        """The frame will not finish: skip what is queued, and end."""
        self._abandoned = True
        self._parts.put(None)

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise LocalProtocolError(
                "this process was forked while a big frame was arriving; only the parent "
                "can finish that frame"
            )

    def digest(self) -> bytes:
        self._check_process()
        self._parts.put(None)
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        return self._hasher.digest()  # type: ignore[no-any-return]

    def copy(self) -> Any:
        """A plain hash state with every part given so far."""
        self._check_process()
        caught_up = threading.Event()
        self._parts.put(caught_up)
        while not caught_up.wait(0.05):
            if not self._thread.is_alive():
                raise LocalProtocolError("the frame's hashing ended before it was copied")
        return self._hasher.copy()


def sending_hasher(algorithm: str, size: int) -> Any:
    """A hash state for a blob of ``size`` bytes about to be sent: for a big one, hashed on
    a thread of its own while the sending thread sends the same bytes (both only read
    them), when one can be had; ``digest()`` waits for it."""
    if size >= THREAD_HASH_AT and _HashingThread.available():
        hashing = _HashingThread(algorithm)
        if hashing.start():
            return hashing
    return new_hasher(algorithm)


def abandon_hashing(hasher: Any) -> None:
    """The blob ``hasher`` (from :func:`sending_hasher`) hashes will not be sent whole: its
    thread, if it has one, ends now."""
    if isinstance(hasher, _HashingThread):
        hasher.abandon()


class RecycledBuffers:
    """The receive buffers of the last few big frames, so that the next frame of the same size
    arrives into one nobody uses any more instead of into fresh memory, which the kernel zeroes
    page by page (about as long as hashing it).

    A buffer is free once nothing refers to it but this list: the value made from it (views of
    it, the arrays on them) is gone. The most recent ``count`` buffers of ``RECYCLE_AT`` bytes
    or more are kept, ``limit`` bytes at most; one that stays free for ``RECYCLE_IDLE``
    seconds is let go (:meth:`sweep`, on the process's heartbeat), and its memory with it.
    """

    def __init__(self, count: int = 2, limit: int = 1 << 28) -> None:
        self._count = count
        self._limit = limit
        self._lock = threading.Lock()
        self._buffers: list[mmap.mmap] = []
        self._free_since: dict[int, float] = {}  # id of a kept buffer -> when first seen free

    def take(self, length: int) -> mmap.mmap | None:
        """A free buffer of exactly ``length`` bytes, or None."""
        with self._lock:
            buffers = self._buffers
            for index in range(len(buffers)):
                if len(buffers[index]) == length and _references(buffers, index) <= _UNUSED:
                    buffer = buffers.pop(index)
                    buffers.append(buffer)
                    self._free_since.pop(id(buffer), None)
                    return buffer
        return None

    def keep(self, buffer: mmap.mmap) -> None:
        """Keep ``buffer`` (just made for a frame) for a later frame once it is free."""
        if _UNUSED < 0:
            return
        with self._lock:
            self._buffers.append(buffer)
            del self._buffers[: -self._count]
            while sum(len(kept) for kept in self._buffers) > self._limit:
                del self._buffers[0]
            kept = {id(buffer) for buffer in self._buffers}
            self._free_since = {k: t for k, t in self._free_since.items() if k in kept}

    def sweep(self, now: float, idle: float | None = None) -> None:
        """Let go of the buffers free since ``idle`` seconds (RECYCLE_IDLE) before ``now``
        (``time.monotonic()``): a value deleted or replaced gives its memory back."""
        idle = RECYCLE_IDLE if idle is None else idle
        with self._lock:
            buffers = self._buffers
            for index in reversed(range(len(buffers))):
                key = id(buffers[index])
                if _references(buffers, index) > _UNUSED:
                    self._free_since.pop(key, None)
                elif now - self._free_since.setdefault(key, now) >= idle:
                    del buffers[index]
                    self._free_since.pop(key, None)


def _references(objects: list[Any], index: int) -> int:
    return sys.getrefcount(objects[index])


# What _references counts for an object that only its list refers to (the interpreter's own
# references while counting vary between versions: measured, not assumed). Without reference
# counts (PyPy), nothing is ever known to be free, so nothing is recycled.
_UNUSED = _references([object()], 0) if hasattr(sys, "getrefcount") else -1
RECYCLE_AT = 1 << 24
MAP_AHEAD = 1 << 22  # bytes of a frame's buffer mapped ahead of what arrived, unless populated
RECYCLE_IDLE = 10.0  # seconds a kept receive buffer may stay free before it is let go
RECYCLED = RecycledBuffers()


class ArrivingFrame:
    """A bulk frame arriving: its payload buffer, filled and hashed as bytes come in."""

    __slots__ = (
        "__weakref__",
        "ahead",
        "blob_start",
        "data",
        "filled",
        "fresh",
        "hasher",
        "header",
        "length",
        "owned",
        "seq",
        "spill",
    )

    def __init__(
        self,
        header: bytes,
        length: int,
        seq: int,
        blob: int,
        algorithm: str | None,
        populate: bool,
        spiller: Spiller | None = None,
        *,
        owned: bool = False,
    ) -> None:
        """``owned``: only the reader of this frame's answer reads its blob (a member's
        frames), so that, arrived into fresh memory, it may be taken apart (OWNED)."""
        self.header = header
        self.length = length
        self.seq = seq
        self.blob_start = length - blob
        # Anonymous memory, its pages mapped ahead of the bytes arriving (all at once up
        # front, when ``populate``), in huge pages while they are cheap here (fresh_memory).
        recycled = RECYCLED.take(length) if length >= RECYCLE_AT else None
        self.fresh: FreshMemory | None = None
        if recycled is not None:  # its pages are there already; every byte is written over
            VERIFIED.forget(recycled)
            SPILLED.forget(recycled)
            OWNED.forget(recycled)
            self.data = recycled
        else:
            self.fresh = FreshMemory(length)
            self.data = self.fresh.data
            if length >= RECYCLE_AT:
                RECYCLED.keep(self.data)
        self.ahead = length if populate else MAP_AHEAD
        self.owned = owned and recycled is None  # a recycled buffer's pages are worth keeping
        self.filled = 0
        self.hasher: Any = _NO_HASH if algorithm is None else new_hasher(algorithm)
        if algorithm is not None and blob >= THREAD_HASH_AT and _HashingThread.available():
            hashing = _HashingThread(algorithm)
            weakref.finalize(self, hashing.abandon)  # before the thread runs: it always ends
            if hashing.start():
                self.hasher = hashing
        # Where the blob is written as it arrives (a loader's file for it), until verified.
        self.spill: list[Spill | None] = [spiller(blob) if spiller is not None else None]
        if self.spill[0] is not None:
            weakref.finalize(self, _discard_spill, self.spill)

    def abandon(self) -> None:
        """This frame will not finish: let its hashing thread, if any, end now, and remove
        what it spilled."""
        if isinstance(self.hasher, _HashingThread):
            self.hasher.abandon()
        _discard_spill(self.spill)

    def verified(self) -> None:
        """Every byte is in and the frame checked: its spill, if any, goes to SPILLED."""
        spill, self.spill[0] = self.spill[0], None
        if spill is not None:
            SPILLED.remember(self.data, self.length - self.blob_start, spill)
        if self.owned and self.length - self.blob_start >= OWNED_AT:
            cheap = self.fresh is None or self.fresh.cost.cheap
            OWNED.remember(self.data, self.length - self.blob_start, cheap)

    def room(self) -> memoryview:
        """The rest of the payload's buffer, its next pages mapped: to receive into."""
        if self.fresh is not None:
            self.fresh.map_until(self.filled + self.ahead)
        return memoryview(self.data)[self.filled :]

    def feed(self, data: memoryview) -> int:
        """Copy in what belongs to the payload; returns how many bytes of ``data`` it took."""
        take = min(len(data), self.length - self.filled)
        if self.fresh is not None:
            self.fresh.map_until(self.filled + max(take, self.ahead))
        self.data[self.filled : self.filled + take] = data[:take]
        self.account(take)
        return take

    def account(self, size: int) -> None:
        """``size`` more bytes of the payload are in ``data``: hash those of the blob."""
        start, end = self.filled, self.filled + size
        if end > self.blob_start:
            part = memoryview(self.data)[max(start, self.blob_start) : end]
            self.hasher.update(part)
            if (spill := self.spill[0]) is not None:
                spill.write(part)
        self.filled = end

    def clone(self) -> ArrivingFrame:
        """An independent copy: its own buffer, and a plain hash state of what came so far."""
        clone = copy.copy(self)
        clone.data = mmap.mmap(-1, self.length)
        clone.data[:] = self.data[:]
        clone.hasher = self.hasher.copy()
        clone.spill = [None]
        clone.owned = False
        clone.fresh = None
        return clone
