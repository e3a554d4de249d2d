"""The replica's rules, objects in and objects out: versions, removals, lazy values, listeners."""

from __future__ import annotations

import pickle
from typing import ClassVar

import pytest

from clustorage.messages import FUNCTION, VALUE, Entry
from clustorage.replica import LoadEvent, Replica

pytestmark = pytest.mark.timeout(30)


def value(key: str, version: int, obj: object) -> Entry:
    return Entry(VALUE, key, version, pickle.dumps(obj), None, "m", 1.0)


class Poison:
    """A value whose deserialization is recorded (so a test can tell when it happens)."""

    loads: ClassVar[list[str]] = []

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple[object, ...]:
        return (Poison._load, (self.name,))

    @staticmethod
    def _load(name: str) -> Poison:
        Poison.loads.append(name)
        return Poison(name)


def test_newer_versions_win_and_older_ones_are_ignored() -> None:
    """An install of a held or older version changes nothing; force installs an older one."""
    replica = Replica()
    assert replica.install(value("k", 2, "two"))
    assert not replica.install(value("k", 2, "again"))
    assert not replica.install(value("k", 1, "one"))
    assert replica.values["k"] == "two"
    assert replica.install(value("k", 1, "one"), force=True)
    assert replica.values["k"] == "one"


def test_a_lazy_value_is_recorded_not_deserialized() -> None:
    """lazy=True with nobody listening keeps the version and defers the unpickling."""
    Poison.loads.clear()
    replica = Replica()
    entry = value("k", 1, Poison("p"))
    assert replica.install(entry, lazy=True)
    assert Poison.loads == []
    assert "k" not in replica.values
    assert replica.keys() == ["k"]
    assert replica.version(VALUE, "k") == 1
    assert replica.install(entry)  # the same version again: now it is read
    assert Poison.loads == ["p"]
    assert replica.values["k"].name == "p"
    assert not replica.install(entry)


def test_a_lazy_value_is_superseded_and_removed_like_any_other() -> None:
    """A newer version replaces an unread one; a removal forgets it."""
    replica = Replica()
    replica.install(value("k", 1, "one"), lazy=True)
    replica.install(value("k", 2, "two"))
    assert replica.values["k"] == "two"
    replica.install(value("gone", 1, "x"), lazy=True)
    assert replica.remove(VALUE, "gone", 2)
    assert replica.keys() == ["k"]
    assert replica.version(VALUE, "gone") == 0


def test_listeners_make_installs_eager() -> None:
    """With an on_load listener, lazy installs deserialize and tell the listener."""
    replica = Replica()
    events: list[LoadEvent] = []
    replica.on_load(events.append)
    replica.install(value("k", 1, "one"), lazy=True)
    assert replica.values["k"] == "one"
    assert [(e.key, e.version, e.obj) for e in events] == [("k", 1, "one")]


def test_functions_are_never_lazy() -> None:
    """lazy applies to values only: a function is installed to be called."""
    replica = Replica()
    entry = Entry(FUNCTION, "f", 1, pickle.dumps(len), "len", "m", 1.0)
    assert replica.install(entry, lazy=True)
    assert replica.functions["f"] is len


class _NeedsAMissingModule:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import importlib

        return (importlib.import_module, ("clustorage_test_no_such_module",))


class _ExitsWhenLoaded:
    def __reduce__(self) -> tuple[object, tuple[int]]:
        import sys

        return (sys.exit, (3,))


def test_a_value_whose_loading_exits_is_recorded_and_the_node_goes_on() -> None:
    """Unpickling that raises SystemExit (a __setstate__ calling sys.exit) does not end the
    thread installing it: the value is recorded, reading it raises an error naming the key,
    and later changes are installed."""
    replica = Replica()
    events: list[LoadEvent] = []
    replica.on_load(events.append)  # installs are eager: the value is loaded as it comes
    exits = Entry(VALUE, "k", 1, pickle.dumps(_ExitsWhenLoaded()), None, "m", 1.0)
    assert replica.install(exits)
    assert replica.install(value("after", 1, "later"))
    assert replica.values["after"] == "later"
    with pytest.raises(RuntimeError, match=r"'k'.*SystemExit"):
        replica.read_unread("k")


def test_removals_after_forgetting_versions_are_still_announced() -> None:
    """Versions forgotten for a loader on another store: what it no longer has is removed,
    and listeners hear of it (a notebook unbinds the name)."""
    replica = Replica()
    replica.install(value("k", 3, "old"))
    events: list[LoadEvent] = []
    replica.on_load(events.append)
    assert replica.forget_versions() == {(VALUE, "k"): 0}
    assert replica.remove(VALUE, "k", 0)
    assert [(event.key, event.removed) for event in events] == [("k", True)]


def test_a_function_version_that_cannot_load_here_takes_the_older_one_away() -> None:
    """A new version of a function that cannot be loaded on this node leaves no older version
    to be called by mistake: the function is not here, and the node goes on."""
    replica = Replica()
    replica.install(Entry(FUNCTION, "f", 1, pickle.dumps(len), None, "m", 1.0))
    assert replica.functions["f"] is len
    broken = pickle.dumps(_NeedsAMissingModule())
    assert not replica.install(Entry(FUNCTION, "f", 2, broken, None, "m", 1.0))
    assert "f" not in replica.functions
    assert replica.version(FUNCTION, "f") == 0


def test_a_tombstone_keeps_an_older_version_from_coming_back() -> None:
    """A deletion is a version: an older value arriving after it stays out."""
    replica = Replica()
    replica.install(value("k", 1, "one"))
    assert replica.remove(VALUE, "k", 2)
    assert not replica.install(value("k", 1, "one"))
    assert "k" not in replica.values
    assert replica.install(value("k", 3, "three"))
    assert replica.values["k"] == "three"
    assert replica.held() == {(VALUE, "k"): 3}


def test_an_older_deletion_does_not_remove_a_newer_value() -> None:
    """A caller's delete answered after a newer put reached the node leaves the put's value."""
    replica = Replica()
    replica.install(value("k", 3, "three"))
    assert not replica.remove(VALUE, "k", 2)
    assert replica.values["k"] == "three"


def test_changes_read_before_a_new_store_are_ignored() -> None:
    """After forget_versions (a loader on another store), an answer from before is ignored."""
    replica = Replica()
    epoch = replica.epoch
    replica.install(value("k", 5, "old"))
    replica.forget_versions()
    assert replica.install(value("k", 1, "new"))
    assert not replica.install(value("k", 6, "late"), epoch=epoch)
    assert not replica.remove(VALUE, "k", 9, epoch=epoch)
    assert replica.values["k"] == "new"
