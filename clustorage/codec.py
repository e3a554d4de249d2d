"""Values and functions in and out of bytes (cloudpickle); errors name the key."""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle

from .errors import ValueTooLarge
from .messages import Blob

__all__ = ["check_size", "dump", "load"]

# Framing and message envelope around a payload, with room to spare.
ENVELOPE = 4096


# Values of these types pickle the same with plain pickle, which is several times faster.
_PLAIN = frozenset({int, float, complex, str, bytes, bytearray, bool, type(None)})


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
        raise TypeError(
            f"cannot store {key!r}: a {type(value).__name__} cannot be serialized by "
            f"cloudpickle ({exc}); store something picklable instead"
        ) from exc
    return payload


def load(payload: Blob) -> Any:
    """Deserialize a payload made by :func:`dump` (from an authenticated peer only)."""
    return pickle.loads(payload)


def check_size(key: str, payload: Blob, max_frame: int) -> None:
    """Raise ValueTooLarge if ``payload`` cannot travel in one frame of ``max_frame`` bytes."""
    if len(payload) + ENVELOPE > max_frame:
        raise ValueTooLarge(
            f"{key!r} is {len(payload)} bytes serialized, over the frame limit of {max_frame} "
            f"bytes; raise it with CLUSTORAGE_MAX_FRAME (or max_frame=) on every node"
        )
