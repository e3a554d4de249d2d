"""Values and functions in and out of bytes (cloudpickle); errors name the key."""

from __future__ import annotations

import pickle
import struct
from typing import Any

import cloudpickle

from .bigbytes import BIG_BYTES_END, COPY_AT, HEAD_SIZE, copy_to_bytes, landing_size
from .bulk import landed
from .errors import ValueTooLarge
from .messages import Blob, Gathered, Payload

__all__ = [
    "COPY_AT",
    "check_size",
    "dump",
    "dump_borrowing",
    "load",
    "size_limit",
]

# Framing and message envelope around a payload, with room to spare.
ENVELOPE = 4096
# What every "over the frame limit" error tells the user to do.
RAISE_THE_LIMIT = "raise it with CLUSTORAGE_MAX_FRAME (or max_frame=) on every node"
SPLIT_IT = "store it as several smaller values"
# How a payload with out-of-band buffers starts (a pickle starts with its PROTO opcode,
# 0x80): then the number of buffers, the pickle's length and each buffer's, little-endian.
_OUT_OF_BAND = b"\x00oob"


# Values of these types pickle the same with plain pickle, which is several times faster.
_PLAIN = frozenset({int, float, complex, str, bytes, bytearray, bool, type(None)})
_SIZED = (str, bytes, bytearray)
# Buffers from this size on are sent from the value's own memory (pickle writes them out
# whole at 64 KiB, its frame size, and up).
BORROW_AT = 1 << 16


class _Gatherer:
    """A pickle output file that keeps big read-only buffers as they are, without copying.

    The pickler hands a bytes, bytearray or PickleBuffer of 64 KiB or more straight to
    ``write`` (CPython's pickle streams large data past its frame buffer). One that nobody
    can change (a bytes, a str's UTF-8, a read-only array) is kept by reference; anything
    else is copied, as ``pickle.dumps`` would.
    """

    def __init__(self) -> None:
        self.parts: list[Blob] = []
        self._small = bytearray()

    def write(self, data: Any) -> int:
        view = memoryview(data)
        if view.nbytes < BORROW_AT:
            self._small += data if type(data) is bytes else view.tobytes(order="A")
            return view.nbytes
        if self._small:
            self.parts.append(bytes(self._small))
            self._small = bytearray()
        if view.readonly and view.c_contiguous:
            self.parts.append(view.cast("B") if view.ndim != 1 or view.format != "B" else view)
        else:  # in memory order, as pickle itself writes a buffer
            self.parts.append(view.tobytes(order="A"))
        return view.nbytes

    def payload(self) -> Payload:
        if not self.parts:
            return bytes(self._small)
        if self._small:
            self.parts.append(bytes(self._small))
        return Gathered(tuple(self.parts))


def dump(key: str, value: Any) -> bytes:
    """Serialize ``value`` stored under ``key``.

    Raises:
        TypeError: cloudpickle cannot serialize the value; the message names the key.
    """
    if type(value) in _PLAIN:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    try:
        payload: bytes = cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise _unserializable(key, value, exc) from exc
    return payload


def dump_borrowing(key: str, value: Any) -> Payload:
    """:func:`dump`, except that big buffers inside the value are not copied into the
    pickle: a large bytes, a str's UTF-8 or a read-only array is referenced in a
    :class:`~clustorage.messages.Gathered` payload (send it, then drop it), and arrays'
    buffers (numpy, pandas: pickle protocol 5), read-only or not, travel out of band,
    after the pickle, straight from the array's memory, so that :func:`load` hands them
    to the value without copying them.

    Raises:
        TypeError: cloudpickle cannot serialize the value; the message names the key.
    """
    plain = type(value) in _PLAIN
    if plain and (not isinstance(value, _SIZED) or len(value) < BORROW_AT):
        return dump(key, value)
    gatherer = _Gatherer()
    buffers: list[Blob] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        """Keep a big contiguous buffer apart (False); anything else goes in the pickle."""
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous
            return True
        if raw.nbytes < BORROW_AT:
            return True
        # An array's memory is sent as it lies, not copied (a copy of 100 MB costs more than
        # sending it): like pickling it, a put takes no snapshot, so an array changed by
        # another thread while its put runs may be stored half changed (README). A bytearray
        # is copied: it could not be resized while the payload borrowed it.
        buffers.append(raw.tobytes() if isinstance(raw.obj, bytearray) else raw)
        return False

    pickler = pickle.Pickler if plain else cloudpickle.CloudPickler
    try:
        pickler(gatherer, protocol=5, buffer_callback=out_of_band).dump(value)
    except Exception as exc:
        raise _unserializable(key, value, exc) from exc
    pickled = gatherer.payload()
    if not buffers:
        return pickled
    lengths = [len(buffer) for buffer in buffers]
    header = _OUT_OF_BAND + struct.pack(
        f"<I{len(lengths) + 1}Q", len(lengths), len(pickled), *lengths
    )
    inner = pickled.parts if isinstance(pickled, Gathered) else (pickled,)
    return Gathered((header, *inner, *buffers))


def _unserializable(key: str, value: Any, exc: Exception) -> TypeError:
    return TypeError(
        f"cannot store {key!r}: a {type(value).__name__} cannot be serialized by "
        f"cloudpickle ({exc}); store something picklable instead"
    )


def _big_bytes(payload: Blob) -> bytes | None:
    """The value of a payload that is one big pickled bytes and nothing else (protocol 5:
    PROTO, BINBYTES and its length, the bytes, MEMOIZE, STOP): the bytes object it was
    received straight into (``bulk.landed``), or one it is copied into in huge pages; or
    None (then unpickle it)."""
    if len(payload) < COPY_AT:
        return None
    value = landed(payload)
    if value is not None:
        return value
    size = landing_size(payload[:HEAD_SIZE], len(payload))
    if size is None or payload[-len(BIG_BYTES_END) :] != BIG_BYTES_END:
        return None
    return copy_to_bytes(memoryview(payload)[HEAD_SIZE : HEAD_SIZE + size])


def load(payload: Blob) -> Any:
    """Deserialize a payload made by :func:`dump` or :func:`dump_borrowing` (from an
    authenticated peer only). Out-of-band buffers are handed to the value as views of
    ``payload``, not copied; a big bytes value is made in huge pages (bigbytes)."""
    if payload[:4] != _OUT_OF_BAND:
        value = _big_bytes(payload)
        return pickle.loads(payload) if value is None else value
    view = memoryview(payload)
    (count,) = struct.unpack_from("<I", view, 4)
    sizes = struct.unpack_from(f"<{count + 1}Q", view, 8)
    start = 8 + 8 * (count + 1)
    pickled, start = view[start : start + sizes[0]], start + sizes[0]
    buffers = []
    for size in sizes[1:]:
        buffers.append(view[start : start + size])
        start += size
    return pickle.loads(pickled, buffers=buffers)


def size_limit(max_frame: int) -> int:
    """The size limit of a value (SPEC "Durability"): one number, the smaller of the frame
    limit and what the loader's store can hold. A payload too big for one SQLite row has a
    file of its own there (clustorage.blobs), so the frame limit is the one that binds."""
    return max_frame


def check_size(key: str, payload: Payload, max_frame: int) -> None:
    """Raise ValueTooLarge if ``payload`` is over the size limit: if it cannot travel in one
    frame of ``max_frame`` bytes, or the loader's store could not hold it."""
    limit = size_limit(max_frame)
    if len(payload) + ENVELOPE + len(key.encode(errors="surrogatepass")) > limit:
        where = "the frame limit" if limit == max_frame else "what the loader's store holds"
        raise ValueTooLarge(
            f"{key!r} is {len(payload)} bytes serialized, over the size limit of {limit} "
            f"bytes ({where}); {RAISE_THE_LIMIT if limit == max_frame else SPLIT_IT}"
        )
