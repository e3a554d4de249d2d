"""Fresh memory for big receive buffers: mapped ahead of the bytes, in the page size that
is cheaper here (clustorage.fresh_memory). A fake clock stands for slow huge pages."""

from __future__ import annotations

import itertools
import mmap
from collections.abc import Callable, Iterator

import pytest

from clustorage import fresh_memory
from clustorage.fresh_memory import COLD_HUGE_PAGE, HUGE_PAGE, RECHECK, FreshMemory

pytestmark = pytest.mark.timeout(60)

LENGTH = 8 * HUGE_PAGE + 12345  # not a whole number of pages


@pytest.fixture(autouse=True)
def fresh_weather(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts where huge pages were never found cold."""
    monkeypatch.setattr(fresh_memory, "_weather", fresh_memory._Weather())
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
    fresh_memory._weather.populate_write = False
    memory = FreshMemory(LENGTH)
    written(memory, HUGE_PAGE + 1)
    before = memory.data[:]
    memory.map_until(LENGTH)
    assert memory.mapped == LENGTH and memory.data[:] == before


@pytest.mark.skipif(not fresh_memory.HUGE_PAGES, reason="the kernel gives no huge pages")
def test_two_slow_huge_pages_in_a_row_turn_the_rest_to_small_pages() -> None:
    slow = 2 * COLD_HUGE_PAGE
    memory = FreshMemory(LENGTH, clock=clock([slow, 0.0, slow, slow]))
    assert memory._huge
    memory.map_until(LENGTH)
    assert not memory._huge  # the 2nd and 3rd whole huge pages were slow
    assert not fresh_memory.huge_pages_are_cheap()
    assert not FreshMemory(LENGTH)._huge  # the next buffer too, for a while
    assert memory.data[:] == bytes(LENGTH)


@pytest.mark.skipif(not fresh_memory.HUGE_PAGES, reason="the kernel gives no huge pages")
def test_one_slow_huge_page_alone_is_a_busy_cpu() -> None:
    slow = 2 * COLD_HUGE_PAGE
    memory = FreshMemory(LENGTH, clock=clock([slow, 0.0, slow, 0.0, slow]))
    memory.map_until(LENGTH)
    assert memory._huge and fresh_memory.huge_pages_are_cheap()


def test_huge_pages_found_cold_are_tried_again_after_a_while() -> None:
    fresh_memory.found_cold(now=100.0)
    assert not fresh_memory.huge_pages_are_cheap(now=100.0 + RECHECK / 2)
    assert fresh_memory.huge_pages_are_cheap(now=100.0 + RECHECK) == fresh_memory.HUGE_PAGES


def test_a_small_buffer_never_asks_for_huge_pages() -> None:
    assert not FreshMemory(HUGE_PAGE)._huge
    assert len(FreshMemory(mmap.PAGESIZE).data) == mmap.PAGESIZE
