"""Fresh memory for big buffers: mapped ahead of the bytes, in the page size that is cheaper
here (clustorage.fresh_memory), and big bytes values copied into it (clustorage.bigbytes).
A fake clock stands for slow huge pages."""

from __future__ import annotations

import gc
import itertools
import mmap
from collections.abc import Callable, Iterator

import pytest

from clustorage import bigbytes, fresh_memory
from clustorage.fresh_memory import COLD_HUGE_PAGE, HUGE_PAGE, FreshMemory, HugePageCost

pytestmark = pytest.mark.timeout(60)

LENGTH = 8 * HUGE_PAGE + 12345  # not a whole number of pages


@pytest.fixture(autouse=True)
def fresh_kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts on a kernel thought to have MADV_POPULATE_WRITE."""
    monkeypatch.setattr(fresh_memory, "_kernel", fresh_memory._Kernel())
    yield


def clock(seconds_per_reading: list[float]) -> Callable[[], float]:
    """A clock whose every second reading is later than the one before by the next of
    ``seconds_per_reading`` (the first reading of each pair starts a timing)."""
    now = itertools.count()
    steps = iter(seconds_per_reading)
    total = [0.0]

    def read() -> float:
        if next(now) % 2:
            total[0] += next(steps, 0.0)
        return total[0]

    return read


def written(memory: FreshMemory, upto: int) -> None:
    """Write the pattern ``memory`` should keep into its first ``upto`` bytes."""
    memory.data[:upto] = bytes(range(256)) * (upto // 256) + bytes(upto % 256)


def test_mapping_ahead_changes_no_byte() -> None:
    memory = FreshMemory(LENGTH)
    written(memory, 3 * HUGE_PAGE + 17)
    before = memory.data[:]
    memory.map_until(5 * HUGE_PAGE)
    memory.map_until(LENGTH + HUGE_PAGE)  # past the end: up to it
    assert memory.mapped == LENGTH
    assert memory.data[:] == before
    assert memory.data[3 * HUGE_PAGE + 17 :] == bytes(LENGTH - 3 * HUGE_PAGE - 17)


def test_without_populate_write_each_page_is_touched_and_kept() -> None:
    fresh_memory._kernel.populate_write = False
    memory = FreshMemory(LENGTH)
    written(memory, HUGE_PAGE + 1)
    before = memory.data[:]
    memory.map_until(LENGTH)
    assert memory.mapped == LENGTH and memory.data[:] == before


def test_two_slow_huge_pages_in_a_row_are_cold_one_alone_is_a_busy_cpu() -> None:
    slow, quick = 2 * COLD_HUGE_PAGE, COLD_HUGE_PAGE / 20
    busy = HugePageCost()
    busy.cheap = True  # as where the kernel has huge pages
    assert all(busy.took(seconds) for seconds in (slow, quick, slow, quick, slow, quick))
    cold = HugePageCost()
    cold.cheap = True
    assert [cold.took(seconds) for seconds in (slow, quick, slow, slow, quick)] == [
        True,
        True,
        True,
        False,
        False,  # once cold, cold for the rest of the buffer
    ]


@pytest.mark.skipif(not fresh_memory.HUGE_PAGES, reason="the kernel gives no huge pages")
def test_a_buffer_whose_huge_pages_are_slow_maps_the_rest_in_small_pages() -> None:
    slow = 2 * COLD_HUGE_PAGE
    memory = FreshMemory(LENGTH, clock=clock([slow, 0.0, slow, slow]))
    assert memory.cost.cheap
    memory.map_until(LENGTH)
    assert not memory.cost.cheap
    assert memory.mapped == LENGTH and memory.data[:] == bytes(LENGTH)
    assert FreshMemory(LENGTH).cost.cheap  # the next buffer finds out for itself


def test_a_buffer_of_a_page_or_two_is_mapped_whole() -> None:
    for length in (mmap.PAGESIZE, HUGE_PAGE + 1, 2 * HUGE_PAGE - 1):
        memory = FreshMemory(length)
        memory.map_until(length)
        assert memory.mapped == length and memory.data[:] == bytes(length)


@pytest.mark.parametrize("slow", [False, True])
def test_a_big_bytes_value_is_copied_whole(monkeypatch: pytest.MonkeyPatch, slow: bool) -> None:
    """bigbytes maps the new value's pages a huge page at a time, switching to small pages
    when they are slow (a fake clock), then copies: the value is the source's bytes either
    way, and the source is left as it was."""
    if slow:
        monkeypatch.setattr(bigbytes, "thread_time", clock([1.0] * 1000))
    size = 5 * HUGE_PAGE + 4321
    source = FreshMemory(size + 123)
    pattern = bytes(range(251)) * (size // 251 + 1)
    source.data[123 : 123 + size] = pattern[:size]
    view = memoryview(source.data)[123 : 123 + size]
    value = bigbytes.copy_to_bytes(view)
    if value is None:
        pytest.skip("bigbytes needs CPython and ctypes")
    assert type(value) is bytes and value == pattern[:size]
    assert source.data[123 : 123 + size] == pattern[:size]


@pytest.mark.skipif(not bigbytes.CAN_LAND, reason="landing needs CPython and ctypes")
@pytest.mark.parametrize("populate_write", [True, False])
def test_a_landing_is_a_new_bytes_object_filled_in_place(populate_write: bool) -> None:
    """A Landing's value is a bytes object nobody else has seen; its pages map a huge page at
    a time (slow ones, by a fake clock, turn the rest to small pages), by MADV_POPULATE_WRITE
    or, on an older kernel, a touch per page that changes no byte; a view of it keeps the
    value alive after the landing is gone."""
    fresh_memory._kernel.populate_write = populate_write
    size = 3 * HUGE_PAGE + 777
    slow = COLD_HUGE_PAGE * 2
    land = bigbytes.Landing(size, clock=clock([slow] * 10))
    assert type(land.value) is bytes and len(land.value) == size
    pattern = bytes(range(253)) * (size // 253 + 1)
    land.view[: HUGE_PAGE // 2] = pattern[: HUGE_PAGE // 2]
    land.map_until(size)
    assert land.mapped == size and land.value[: HUGE_PAGE // 2] == pattern[: HUGE_PAGE // 2]
    assert not land.cost.cheap or not fresh_memory.HUGE_PAGES
    land.view[:] = pattern[:size]
    part = land.view[size - 10 :]
    del land
    gc.collect()
    assert bytes(part) == pattern[size - 10 : size]


def test_the_kernels_huge_page_setting_is_read_from_its_brackets() -> None:
    assert fresh_memory.thp_setting("always [madvise] never\n") == "madvise"
    assert fresh_memory.thp_setting("[always] madvise never\n") == "always"
    assert fresh_memory.thp_setting("always madvise [never]\n") == "never"
    assert fresh_memory.thp_setting("") == "never"
