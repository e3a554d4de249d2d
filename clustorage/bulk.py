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

from .bigbytes import BIG_BYTES_END, CAN_LAND, COPY_AT, HEAD_SIZE, Landing, landing_size
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
    "RECYCLED",
    "RECYCLE_AT",
    "RECYCLE_IDLE",
    "SPILLED",
    "THREAD_HASH_AT",
    "VERIFIED",
    "ArrivingFrame",
    "ReceiveBuffer",
    "RecycledBuffers",
    "Spill",
    "SpilledBlobs",
    "Spiller",
    "VerifiedDigests",
    "abandon_hashing",
    "bulk_digests_by_speed",
    "landed",
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


class ReceiveBuffer(mmap.mmap):
    """A big frame's receive buffer. ``landed``: (the blob's length, its value), when the
    blob was one big pickled bytes that a member received straight into a bytes object of
    its own (:class:`~clustorage.bigbytes.Landing`): the buffer's tail then holds only the
    pickle's opcodes around zeros, and :func:`landed` gives the value."""

    __slots__ = ("landed",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.landed: tuple[int, bytes] | None = None


def landed(blob: Blob) -> bytes | None:
    """The value that ``blob`` (a verified frame's blob) was received into, if it landed."""
    owner = blob.obj if isinstance(blob, memoryview) else blob
    if type(owner) is not ReceiveBuffer or owner.landed is None:
        return None
    length, value = owner.landed
    return value if length == len(blob) else None


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
        self._buffers: list[ReceiveBuffer] = []
        self._free_since: dict[int, float] = {}  # id of a kept buffer -> when first seen free

    def take(self, length: int) -> ReceiveBuffer | None:
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

    def keep(self, buffer: ReceiveBuffer) -> None:
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

    def forget(self, buffer: ReceiveBuffer) -> None:
        """Keep ``buffer`` no more (its pages will not be there for a later frame)."""
        with self._lock:
            self._buffers = [kept for kept in self._buffers if kept is not buffer]
            self._free_since.pop(id(buffer), None)

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
    """A bulk frame arriving: its payload buffer, filled and hashed as bytes come in.

    A member's blob that turns out to be one big pickled bytes lands straight in a bytes
    object of its own (``land``, decided once the bytes before the value are in): the
    receive buffer gets the rest, and the value is not copied out of it afterwards. Every
    part given to :meth:`room` or taken by :meth:`feed` lies in one of the two."""

    __slots__ = (
        "__weakref__",
        "ahead",
        "blob_start",
        "data",
        "filled",
        "fresh",
        "hasher",
        "header",
        "land",
        "land_from",
        "length",
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
    ) -> None:
        """``populate``: the sender's header is trusted (a member's frames, from its loader):
        the whole buffer is mapped up front, and a big bytes value lands in a bytes object
        of its own, made once its size is known."""
        self.header = header
        self.length = length
        self.seq = seq
        self.blob_start = length - blob
        # Anonymous memory, its pages mapped ahead of the bytes arriving (all at once up
        # front, when ``populate``), in huge pages while they are cheap here (fresh_memory).
        recycled = RECYCLED.take(length) if length >= RECYCLE_AT else None
        self.fresh: FreshMemory | None = None
        self.data: ReceiveBuffer
        if recycled is not None:  # its pages are there already; every byte is written over
            VERIFIED.forget(recycled)
            SPILLED.forget(recycled)
            recycled.landed = None
            self.data = recycled
        else:
            self.fresh = FreshMemory(length, buffer_type=ReceiveBuffer)
            self.data = self.fresh.data  # type: ignore[assignment]
        self.ahead = length if populate else MAP_AHEAD
        self.land: Landing | None = None
        # Where the value would start, if the blob is one big pickled bytes (None: it is
        # not, or not to land); until then the buffer is mapped no further than that.
        self.land_from = (
            self.blob_start + HEAD_SIZE if populate and blob >= COPY_AT and CAN_LAND else None
        )
        if self.land_from is None:
            self._keep_for_later()
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
        self.land = None

    def verified(self) -> None:
        """Every byte is in and the frame checked: its spill, if any, goes to SPILLED, and a
        value that landed to its buffer's ``landed``."""
        spill, self.spill[0] = self.spill[0], None
        if spill is not None:
            SPILLED.remember(self.data, self.length - self.blob_start, spill)
        land, self.land = self.land, None
        if land is not None and self.land_from is not None:
            end = self.land_from + land.length
            if self.data[end:] == BIG_BYTES_END:
                self.data.landed = (self.length - self.blob_start, land.value)
                VERIFIED.forget(self.data)  # its digest is not that of the bytes it holds
                if self.fresh is None:  # recycled: another frame's bytes are there
                    self._zero(self.land_from, end)
                return
            self.data[self.land_from : end] = land.view  # not a pickled bytes after all

    def _zero(self, start: int, end: int) -> None:
        """``data[start:end]`` reads as zeros, its whole pages given back."""
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self.data.madvise(mmap.MADV_DONTNEED, first, last - first)
        else:
            first = last = end
        self.data[start:first] = bytes(first - start)
        self.data[last:end] = bytes(end - last)

    def _landing_at(self, at: int) -> tuple[Landing, int] | None:
        """The landing byte ``at`` of the payload goes to, and where in it; None if it goes
        to the receive buffer."""
        land, land_from = self.land, self.land_from
        if land is None or land_from is None or not land_from <= at < land_from + land.length:
            return None
        return land, at - land_from

    def room(self) -> memoryview:
        """Where the next bytes of the payload go, its next pages mapped: to receive into."""
        at, land_from = self.filled, self.land_from
        if (landing := self._landing_at(at)) is not None:
            land, offset = landing
            land.map_until(offset + self.ahead)
            return land.view[offset:]
        if land_from is None:
            if self.fresh is not None:
                self.fresh.map_until(at + self.ahead)
            return memoryview(self.data)[at:]
        # Not mapped ahead: only the few bytes before the value, or the two after it, land here.
        return memoryview(self.data)[at : land_from if at < land_from else self.length]

    def feed(self, data: memoryview) -> int:
        """Copy in what belongs to the payload; returns how many bytes of ``data`` it took."""
        taken = 0
        while taken < len(data) and self.filled < self.length:
            room = self.room()
            size = min(len(room), len(data) - taken)
            room[:size] = data[taken : taken + size]
            self.account(size)
            taken += size
        return taken

    def account(self, size: int) -> None:
        """``size`` more bytes of the payload are in :meth:`room`: hash those of the blob."""
        start, end = self.filled, self.filled + size
        if end > self.blob_start:
            part = self._written(max(start, self.blob_start), end)
            self.hasher.update(part)
            if (spill := self.spill[0]) is not None:
                spill.write(part)
        self.filled = end
        if end == self.land_from and self.land is None:
            self._decide_landing()

    def _written(self, start: int, end: int) -> memoryview:
        if (landing := self._landing_at(start)) is not None:
            land, offset = landing
            return land.view[offset : offset + end - start]
        return memoryview(self.data)[start:end]

    def _decide_landing(self) -> None:
        """The bytes before the value are in: whether the blob is one big pickled bytes,
        which then lands in a bytes object of its own."""
        assert self.land_from is not None
        head = memoryview(self.data)[self.blob_start : self.land_from]
        size = landing_size(head, self.length - self.blob_start)
        if size is not None:
            try:
                self.land = Landing(size)
            except MemoryError:
                self.land = None
        if self.land is None:
            self.land_from = None  # the rest arrives here, mapped ahead as usual
            self._keep_for_later()
        else:
            RECYCLED.forget(self.data)  # a recycled one: its pages go back once verified

    def _keep_for_later(self) -> None:
        """A fresh buffer that fills whole: kept for a later frame of its size."""
        if self.fresh is not None and self.length >= RECYCLE_AT:
            RECYCLED.keep(self.data)

    def clone(self) -> ArrivingFrame:
        """An independent copy: its own buffer, and a plain hash state of what came so far."""
        clone = copy.copy(self)
        clone.data = ReceiveBuffer(-1, self.length)
        clone.data[:] = self.data[:]
        land, land_from = self.land, self.land_from
        if land is not None and land_from is not None:
            upto = min(self.filled, land_from + land.length)
            if upto > land_from:
                clone.data[land_from:upto] = land.view[: upto - land_from]
        clone.land = None
        clone.land_from = None
        clone.hasher = self.hasher.copy()
        clone.spill = [None]
        clone.fresh = None
        return clone
