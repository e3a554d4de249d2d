"""Big values: streamed as bulk frames, forwarded without re-hashing, installed everywhere.

An in-process loader and in-process members on 127.0.0.1 (real sockets, real frames).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

import clustorage
import clustorage.runtime
from clustorage.protocol import BULK
from clustorage.replica import LoadEvent
from tests.conftest import COOKIE, node_pair

pytestmark = pytest.mark.timeout(60)

BIG = bytes(range(256)) * (3 * BULK // 256 + 7)  # a few bulk chunks, not a round size


def eventually(check: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait until ``check()`` holds, polling; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{check} still false after {seconds}s")
        time.sleep(0.01)


@pytest.fixture
def trio() -> Iterator[tuple[clustorage.Node, clustorage.Node, clustorage.Node]]:
    """The loader ``l``, member ``m`` and a second member ``o``."""
    with (
        node_pair() as (loader, member),
        clustorage.Node("o", member.loader_address, cookie=COOKIE) as other,
    ):
        yield loader, member, other


def installed(node: clustorage.Node, key: str) -> threading.Event:
    """An event set once ``node`` installs a value under ``key``."""
    done = threading.Event()

    def listener(event: LoadEvent) -> None:
        if event.key == key and not event.removed:
            done.set()

    node.on_load(listener)
    return done


def test_a_big_value_reaches_every_node_intact(trio: tuple[clustorage.Node, ...]) -> None:
    """A value over the bulk size put on one member arrives whole on the other and the loader."""
    loader, member, other = trio
    arrived = installed(other, "big")
    version = member.put("big", BIG)
    assert arrived.wait(10)
    assert other.get("big") == BIG
    assert type(other.get("big")) is bytes
    eventually(lambda: loader.keys() == ["big"])
    assert loader.get("big") == BIG
    assert loader.history("big", kind="value")[-1].version == version


def test_a_big_value_computed_by_get_is_shared(trio: tuple[clustorage.Node, ...]) -> None:
    """get's fn returning a big value: the value is committed and hot-loaded like any other."""
    _, member, other = trio
    arrived = installed(other, "computed")
    assert member.get("computed", lambda: BIG) == BIG
    assert arrived.wait(10)
    assert other.get("computed", lambda: pytest.fail("computed twice")) == BIG


def test_the_loaders_node_keeps_the_order_of_big_and_small_changes(
    trio: tuple[clustorage.Node, ...],
) -> None:
    """Big values the loader's own node installs late still apply in order with later changes."""
    loader, member, other = trio
    member.put("k", BIG)
    member.put("k", "small")
    member.put("gone", BIG)
    member.delete("gone")
    eventually(lambda: loader.keys() == ["k"] and loader.get("k") == "small")
    assert other.get("k") == "small"


def test_big_values_in_both_directions_between_members(trio: tuple[clustorage.Node, ...]) -> None:
    """Two members put big values at once; each ends up with both."""
    _, member, other = trio
    payloads = {"from_m": BIG + b"m", "from_o": BIG + b"o"}
    threads = [
        threading.Thread(target=member.put, args=("from_m", payloads["from_m"])),
        threading.Thread(target=other.put, args=("from_o", payloads["from_o"])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    for node in (member, other):
        eventually(lambda node=node: set(payloads) <= set(node.keys()))  # type: ignore[misc]
        assert {key: node.get(key) for key in payloads} == payloads


def test_a_late_joiner_gets_big_values_in_its_resync(
    trio: tuple[clustorage.Node, ...],
) -> None:
    """A node that connects after a big value was stored receives it with its resync."""
    _, member, _ = trio
    member.put("early", BIG)
    with clustorage.Node("late", member.loader_address, cookie=COOKIE) as late:
        assert late.get("early") == BIG


def test_the_loaders_node_installs_big_values_after_frames_going_out(
    trio: tuple[clustorage.Node, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a big frame is still going out to a member, the loader's own node holds back big
    values (and every change after them, in order); it installs them once the frame is out."""
    loader, member, _ = trio
    sending = threading.Event()
    sending.set()
    monkeypatch.setattr(loader._channel, "sending", sending.is_set)
    monkeypatch.setattr(clustorage.runtime, "BACKLOG_WAIT", 60.0)
    member.put("k", BIG)
    member.put("k", "small")
    member.put("later", 1)
    time.sleep(0.3)
    assert loader.keys() == []
    sending.clear()
    eventually(lambda: loader.keys() == ["k", "later"])
    assert loader.get("k") == "small"
