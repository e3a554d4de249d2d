"""The replica converges: loader events in any order, some twice, end as in version order."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clustorage import codec
from clustorage.messages import FUNCTION, VALUE, Entry
from clustorage.replica import MISSING, LoadEvent, Replica

pytestmark = pytest.mark.timeout(120)

KEYS = ((VALUE, "a"), (VALUE, "b"), (FUNCTION, "f"))

# One loader event: ("install", entry, obj) or ("remove", kind, key, version).
Event = tuple[Any, ...]


def made(kind: str, key: str, version: int) -> Any:
    """What version ``version`` of ``key`` holds: a value, or a function returning it."""
    if kind == VALUE:
        return (key, version)
    return eval(f"lambda: ({key!r}, {version})")  # by value, as a compiled function travels


def entry(kind: str, key: str, version: int) -> Entry:
    obj = made(kind, key, version)
    source = f"lambda: ({key!r}, {version})" if kind == FUNCTION else None
    return Entry(kind, key, version, codec.dump(key, obj), source, "loader", float(version))


def history(kind: str, key: str, writes: list[bool]) -> list[Event]:
    """The loader's numbering of one key's changes: version n is a write or a deletion."""
    events: list[Event] = []
    for version, is_write in enumerate(writes, start=1):
        if is_write:
            events.append(("install", entry(kind, key, version)))
        else:
            events.append(("remove", kind, key, version))
    return events


def deliver(replica: Replica, event: Event, answer: bool, lazy: bool) -> None:
    """One event as a caller's answer (the object in hand) or as a reader's broadcast."""
    if event[0] == "install":
        item: Entry = event[1]
        obj = made(item.kind, item.key, item.version) if answer else MISSING
        replica.install(item, obj, lazy=lazy)
    else:
        _, kind, key, version = event
        replica.remove(kind, key, version, "me" if answer else "loader")


def held(replica: Replica, kind: str, key: str) -> Any:
    """What the replica holds for ``key`` (a function is called), MISSING when absent."""
    if kind == FUNCTION:
        function = replica.functions.get(key)
        return MISSING if function is None else function()
    if key in replica.values:
        return replica.values[key]
    return replica.read_unread(key)


def check_converged(replica: Replica, histories: dict[tuple[str, str], list[bool]]) -> None:
    """The state after applying every key's changes in version order: the last one wins."""
    for (kind, key), writes in histories.items():
        last = len(writes)
        if writes[-1]:
            assert replica.versions.get((kind, key)) == last, (kind, key, replica.versions)
            assert held(replica, kind, key) == (key, last)
        else:
            assert (kind, key) not in replica.versions, (kind, key, replica.versions)
            assert held(replica, kind, key) is MISSING
            assert replica.tombstones.get((kind, key)) == last, (kind, key, replica.tombstones)
    live = {key for (kind, key), writes in histories.items() if kind == VALUE and writes[-1]}
    assert set(replica.keys()) == live
    functions = {key for (kind, key), w in histories.items() if kind == FUNCTION and w[-1]}
    assert set(replica.function_names()) == functions


writes_strategy = st.lists(st.booleans(), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), listening=st.booleans())
def test_any_interleaving_of_answers_and_broadcasts_converges(
    data: st.DataObject, listening: bool
) -> None:
    """Installs and tombstones delivered shuffled and duplicated end as in version order."""
    histories = {key: data.draw(writes_strategy, label=f"writes {key}") for key in KEYS}
    events = [event for key, writes in histories.items() for event in history(*key, writes)]
    order = data.draw(st.permutations(events), label="order")
    extra = data.draw(st.lists(st.sampled_from(events), max_size=len(events)), label="again")
    deliveries = list(order)
    for event in extra:  # each duplicate arrives somewhere after the first
        at = data.draw(st.integers(0, len(deliveries)), label="at")
        deliveries.insert(at, event)
    replica = Replica()
    seen: list[LoadEvent] = []
    if listening:
        replica.on_load(seen.append)
    for event in deliveries:
        answer = data.draw(st.booleans(), label="answer")
        lazy = data.draw(st.booleans(), label="lazy")
        deliver(replica, event, answer, lazy)
    check_converged(replica, histories)
    for kind, key in KEYS:  # listeners hear each key's installs in version order
        mine = [e for e in seen if (e.kind, e.key) == (kind, key)]
        installs = [e.version for e in mine if not e.removed]
        assert installs == sorted(set(installs)), (kind, key, installs)
        if mine:
            assert mine[-1].removed == (not histories[(kind, key)][-1]), mine


@settings(max_examples=30, deadline=None)
@given(writes=st.lists(writes_strategy, min_size=3, max_size=3), seed=st.randoms())
def test_two_threads_racing_the_same_events_converge(writes: list[list[bool]], seed: Any) -> None:
    """A caller's thread and a reader's thread applying the same events race to one state."""
    histories = dict(zip(KEYS, writes, strict=True))
    events = [event for key, w in histories.items() for event in history(*key, w)]
    replica = Replica()
    orders = [list(events), list(events)]
    seed.shuffle(orders[0])
    seed.shuffle(orders[1])
    threads = [
        threading.Thread(target=lambda o=o, a=a: [deliver(replica, e, a, False) for e in o])
        for o, a in zip(orders, (True, False), strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    check_converged(replica, histories)


def test_a_tombstone_hides_an_older_version_that_arrives_late() -> None:
    """A put's answer (v1) applied after the broadcast of its deletion (v2) stays deleted."""
    replica = Replica()
    replica.remove(VALUE, "k", 2, "other")
    assert not replica.install(entry(VALUE, "k", 1), ("k", 1))
    assert replica.keys() == []
    assert replica.tombstones[(VALUE, "k")] == 2
    assert replica.install(entry(VALUE, "k", 3))
    assert replica.values["k"] == ("k", 3)


def test_a_late_deletion_does_not_erase_a_newer_value() -> None:
    """A caller's own delete (v2) reaching its replica after a newer put (v3) changes nothing."""
    replica = Replica()
    replica.install(entry(VALUE, "k", 1))
    replica.install(entry(VALUE, "k", 3))
    assert not replica.remove(VALUE, "k", 2, "me")
    assert replica.values["k"] == ("k", 3)
    assert replica.version(VALUE, "k") == 3


def test_an_event_of_an_earlier_epoch_is_ignored() -> None:
    """After forget_versions (a loader on another store) events of the old epoch do nothing."""
    replica = Replica()
    old = replica.epoch
    replica.install(entry(VALUE, "k", 5), epoch=old)
    replica.remove(VALUE, "gone", 4)
    replica.forget_versions()
    assert replica.epoch != old
    assert replica.tombstones == {}
    assert not replica.install(entry(VALUE, "k", 9), epoch=old)
    assert replica.values["k"] == ("k", 5)
    assert replica.install(entry(VALUE, "k", 1), epoch=replica.epoch)
    assert replica.values["k"] == ("k", 1)
    assert replica.install(entry(VALUE, "gone", 1))
