"""codec: values in and out of bytes; big buffers are borrowed, not copied, on the way out."""

from __future__ import annotations

import array
import ctypes
import pickle
import threading
from typing import Any

import pytest

from clustorage import codec
from clustorage.errors import ValueTooLarge
from clustorage.messages import Gathered

BIG = codec.BORROW_AT


def shares_memory(part: Any, value: Any) -> bool:
    return isinstance(part, memoryview) and part.obj is value


@pytest.mark.parametrize("value", [0, 1.5, "text", b"bytes", None, True, [1, 2], {"a": b"b"}])
def test_small_values_come_out_as_dump_does(value: Any) -> None:
    """Without a big buffer inside, borrowing makes plain bytes that load as the value."""
    payload = codec.dump_borrowing("k", value)
    assert isinstance(payload, bytes)
    assert codec.load(payload) == value


def test_a_big_bytes_is_borrowed_not_copied() -> None:
    value = b"v" * (3 * BIG)
    payload = codec.dump_borrowing("k", value)
    assert isinstance(payload, Gathered)
    assert any(shares_memory(part, value) for part in payload.parts)
    assert len(payload) == sum(len(part) for part in payload.parts)
    assert codec.load(bytes(payload)) == value


def test_a_writable_buffer_is_copied_and_stays_the_callers() -> None:
    """A bytearray can change after the call: it is copied, and can be resized at once,
    even while the payload (or a traceback holding it) lives on."""
    value = bytearray(b"w" * (3 * BIG))
    payload = codec.dump_borrowing("k", value)
    del value[BIG:]
    value[:1] = b"x"
    assert codec.load(bytes(payload)) == bytearray(b"w" * (3 * BIG))


def test_big_buffers_inside_a_structure_are_borrowed() -> None:
    """Every big bytes inside a cloudpickled object stays where it is; the rest is copied."""
    first, second = b"1" * BIG, b"2" * (2 * BIG)
    value = {"first": first, "second": second, "fn": lambda: 42, "small": b"s"}
    payload = codec.dump_borrowing("k", value)
    assert isinstance(payload, Gathered)
    borrowed = [part.obj for part in payload.parts if isinstance(part, memoryview)]
    assert any(obj is first for obj in borrowed) and any(obj is second for obj in borrowed)
    loaded = codec.load(bytes(payload))
    assert loaded["first"] == first and loaded["second"] == second and loaded["fn"]() == 42


def test_a_big_str_goes_out_once_encoded() -> None:
    value = "é" * BIG
    payload = codec.dump_borrowing("k", value)
    assert isinstance(payload, Gathered)
    assert codec.load(bytes(payload)) == value


def test_a_read_only_picklebuffer_is_borrowed_a_writable_one_copied() -> None:
    """Arrays pickle their data as a PickleBuffer (protocol 5): only a read-only one is
    borrowed."""
    frozen, writable = b"r" * (2 * BIG), bytearray(b"w" * (2 * BIG))
    borrowed = codec.dump_borrowing("k", pickle.PickleBuffer(frozen))
    copied = codec.dump_borrowing("k", pickle.PickleBuffer(writable))
    assert isinstance(borrowed, Gathered) and isinstance(copied, Gathered)
    assert any(shares_memory(part, frozen) for part in borrowed.parts)
    assert not any(isinstance(part, memoryview) for part in copied.parts)
    assert bytes(codec.load(bytes(copied))) == bytes(writable)
    assert bytes(codec.load(bytes(borrowed))) == frozen


def test_a_writable_array_buffer_is_sent_from_the_arrays_memory() -> None:
    """A writable buffer of an array (numpy's are) travels out of band without a copy; only
    a bytearray, which a borrowed view would keep from being resized, is copied."""
    memory = array.array("b", b"a" * (2 * BIG))
    payload = codec.dump_borrowing("k", {"a": pickle.PickleBuffer(memory)})
    assert isinstance(payload, Gathered)
    assert any(shares_memory(part, memory) for part in payload.parts)
    assert bytes(codec.load(bytes(payload))["a"]) == bytes(memory)


def test_array_buffers_travel_out_of_band_and_load_without_a_copy() -> None:
    """A big array's buffer goes after the pickle; loading hands it a view of the payload."""
    array = pickle.PickleBuffer(bytes(range(256)) * (BIG // 64))
    payload = bytearray(bytes(codec.dump_borrowing("k", {"a": array, "n": 1})))
    loaded = codec.load(payload)
    assert loaded["n"] == 1 and bytes(loaded["a"]) == bytes(array.raw())
    assert shares_memory(loaded["a"], payload)


def test_a_fortran_order_buffer_keeps_its_memory_order() -> None:
    """pickle writes a buffer's memory as it lies; so does the gatherer."""
    testbuffer = pytest.importorskip("_testbuffer")
    array = testbuffer.ndarray(
        list(range(256 * 64)), shape=[256, 64], format="i", flags=testbuffer.ND_FORTRAN
    )
    buffer = pickle.PickleBuffer(array)
    payload = codec.dump_borrowing("k", buffer)
    assert memoryview(codec.load(bytes(payload))).tobytes() == buffer.raw().tobytes()


def test_unserializable_values_name_the_key() -> None:
    with pytest.raises(TypeError, match=r"'the\.key'.*lock"):
        codec.dump_borrowing("the.key", {"lock": threading.Lock(), "big": b"b" * BIG})
    with pytest.raises(TypeError, match=r"'the\.key'"):
        codec.dump("the.key", threading.Lock())


def test_check_size_counts_every_part() -> None:
    payload = codec.dump_borrowing("k", b"x" * (4 * BIG))
    with pytest.raises(ValueTooLarge, match="'k'"):
        codec.check_size("k", payload, 4 * BIG)


def test_check_size_counts_the_key() -> None:
    """A payload that fits the frame only without its key's bytes is refused before sending."""
    limit = 1 << 20
    key = "k" * 4000
    payload = bytes(limit - codec.ENVELOPE - 100)
    codec.check_size("k", payload, limit)
    with pytest.raises(ValueTooLarge, match="frame limit"):
        codec.check_size(key, payload, limit)


def test_a_big_bytes_value_loads_from_a_writable_buffer_as_bytes() -> None:
    """A big bytes value that arrived in a writable buffer (as a received frame does) loads
    as a bytes of its own, equal to what was put, whether or not huge pages are had."""
    value = bytes(range(256)) * (codec.COPY_AT // 256 + 1)
    arrived = bytearray(bytes(codec.dump_borrowing("k", value)))
    loaded = codec.load(memoryview(arrived))
    arrived[:] = bytes(len(arrived))
    assert type(loaded) is bytes and loaded == value
    assert codec.load(bytes(codec.dump_borrowing("k", value))) == value  # read-only: unpickled
    assert codec.load(memoryview(bytearray(codec.dump("k", [value])))) == [value]


def test_a_big_bytes_value_loads_whatever_another_library_made_of_pythonapi() -> None:
    """ctypes.pythonapi's functions are the whole process's: another library giving
    PyBytes_FromStringAndSize another result type changes nothing here."""
    shared = ctypes.pythonapi.PyBytes_FromStringAndSize
    restype, argtypes = shared.restype, shared.argtypes
    shared.restype, shared.argtypes = ctypes.c_void_p, (ctypes.c_char_p, ctypes.c_ssize_t)
    try:
        value = bytes(range(256)) * (codec.COPY_AT // 256 + 1)
        arrived = bytearray(bytes(codec.dump_borrowing("k", value)))
        assert codec.load(memoryview(arrived)) == value
    finally:
        shared.restype, shared.argtypes = restype, argtypes
