"""A lease outlives its holder's connection, as the loader's rules decide it, messages in and
messages out: the holder reclaims it on a new connection, and a waiter cut off asks again
naming the holder (see clustorage.loader). The same with real processes and a loader killed
-9: tests/test_promises.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from clustorage import loader
from clustorage.errors import StoreError
from clustorage.loader import LoaderCore
from clustorage.messages import (
    VALUE,
    Await,
    Commit,
    Committed,
    Delete,
    Deleted,
    Failed,
    Fetch,
    Found,
    History,
    HistoryReply,
    LeaseGranted,
    Load,
    Message,
    Pushes,
    Put,
    Queued,
    Reclaim,
    Release,
    Sync,
    SyncReply,
    decode,
)
from clustorage.store import MemoryStore
from clustorage.writer import INLINE_LIMIT
from clustorage.writes import WriteHere

pytestmark = pytest.mark.timeout(30)

GRACE = 20.0


class Peer:
    """A node as the loader sees it: what it was sent, in order."""

    address = "127.0.0.1:1"
    connected_since = 0.0

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[Message] = []

    def deliver(self, message: Message, parts: Any = None) -> None:
        self.sent.append(message)

    def answers(self, rid: int) -> list[Message]:
        return [m for m in self.sent if getattr(m, "rid", None) == rid]


class Clock:
    """The loader's scheduler: calls run when the test says the time (from 0) has come,
    unless cancelled before."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[tuple[float, Callable[[], None]]] = []  # (when, call)

    def __call__(self, delay: float, call: Callable[[], None]) -> Any:
        entry = (self.now + delay, call)
        self.calls.append(entry)
        return _Timer(self, entry)

    def run(self, upto: float) -> None:
        self.now = upto
        due, self.calls = (
            [c for d, c in self.calls if d <= upto],
            [(d, c) for d, c in self.calls if d > upto],
        )
        for call in due:
            call()


class _Timer:
    def __init__(self, clock: Clock, entry: tuple[float, Callable[[], None]]) -> None:
        self._clock, self._entry = clock, entry

    def cancel(self) -> None:
        if self._entry in self._clock.calls:
            self._clock.calls.remove(self._entry)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def core(clock: Clock) -> LoaderCore:
    """A loader that just restarted: it knows no lease."""
    return LoaderCore("app1", MemoryStore(), clock, lease_grace=GRACE)


def connect(core: LoaderCore, name: str, *leases: tuple[str, int]) -> Peer:
    """A node joins on a new connection: Reclaim, then Sync, as a member sends them."""
    peer = Peer(name)
    core.join(peer)
    core.handle(peer, Reclaim(tuple(leases)))
    core.handle(peer, Sync(1, {}))
    assert type(peer.answers(1)[-1]) is SyncReply
    return peer


def last(peer: Peer, rid: int) -> Message:
    return peer.answers(rid)[-1]


def pushed(peer: Peer) -> list[Message]:
    """What ``peer`` was sent, each push out of the Pushes frames that carried several."""
    messages: list[Message] = []
    for message in peer.sent:
        messages.extend(map(decode, message.frames) if type(message) is Pushes else [message])
    return messages


def test_a_reclaimed_lease_is_kept_for_its_holder(core: LoaderCore) -> None:
    holder = connect(core, "holder", ("k", 5))
    waiter = connect(core, "waiter")
    core.handle(waiter, Fetch(2, VALUE, "k", True, ()))
    queued = last(waiter, 2)
    assert type(queued) is Queued and queued.holder == "holder"
    core.handle(holder, Commit(3, "k", 5, b"v"))
    assert type(last(holder, 3)) is Committed
    found = last(waiter, 2)
    assert type(found) is Found and bytes(found.entry.payload) == b"v"


def test_an_await_keeps_the_key_until_the_holder_reclaims_it(core: LoaderCore) -> None:
    waiter = connect(core, "waiter")
    core.handle(waiter, Await(2, "k", (), "holder"))
    assert type(last(waiter, 2)) is Queued
    holder = connect(core, "holder", ("k", 7))
    core.handle(holder, Commit(3, "k", 7, b"v"))
    assert type(last(holder, 3)) is Committed
    assert type(last(waiter, 2)) is Found


def test_a_holder_that_does_not_reclaim_may_still_commit_what_it_computed(
    core: LoaderCore,
) -> None:
    """A node of an earlier release sends no Reclaim: its commit settles the kept key."""
    waiter = connect(core, "waiter")
    core.handle(waiter, Await(2, "k", (), "holder"))
    holder = Peer("holder")
    core.join(holder)
    core.handle(holder, Sync(1, {}))
    core.handle(holder, Commit(3, "k", 99, b"v"))
    assert type(last(holder, 3)) is Committed
    assert type(last(waiter, 2)) is Found


def test_an_await_gets_the_lease_when_the_holder_comes_back_without_it(core: LoaderCore) -> None:
    waiter = connect(core, "waiter")
    core.handle(waiter, Await(2, "k", (), "holder"))
    connect(core, "holder")  # its fn ended meanwhile
    assert type(last(waiter, 2)) is LeaseGranted


def test_an_await_gets_the_lease_when_the_holder_never_comes_back(
    core: LoaderCore, clock: Clock
) -> None:
    waiter = connect(core, "waiter")
    core.handle(waiter, Await(2, "k", (), "holder"))
    clock.run(GRACE - 1)
    assert type(last(waiter, 2)) is Queued
    clock.run(GRACE)
    assert type(last(waiter, 2)) is LeaseGranted


def test_an_await_for_a_holder_that_is_back_gets_the_lease_at_once(core: LoaderCore) -> None:
    connect(core, "holder")
    waiter = connect(core, "waiter")
    core.handle(waiter, Await(2, "k", (), "holder"))
    assert type(last(waiter, 2)) is LeaseGranted


def test_an_await_for_a_stored_key_gets_the_value(core: LoaderCore) -> None:
    holder = connect(core, "holder", ("k", 5))
    core.handle(holder, Commit(3, "k", 5, b"v"))
    waiter = connect(core, "waiter")
    core.handle(waiter, Await(2, "k", (), "holder"))
    assert type(last(waiter, 2)) is Found


def test_a_holder_whose_fn_fails_after_reclaiming_passes_the_lease_on(core: LoaderCore) -> None:
    waiter = connect(core, "waiter")
    core.handle(waiter, Await(2, "k", (), "holder"))
    holder = connect(core, "holder", ("k", 7))
    core.handle(holder, Release(0, "k", "ValueError: boom"))
    assert type(last(waiter, 2)) is LeaseGranted


def test_a_reclaim_of_a_key_stored_meanwhile_ends_in_lease_lost(core: LoaderCore) -> None:
    other = connect(core, "other")
    core.handle(other, Fetch(2, VALUE, "k", True, ()))
    core.handle(other, Commit(3, "k", last(other, 2).token, b"theirs"))  # type: ignore[union-attr]
    holder = connect(core, "holder", ("k", 5))
    core.handle(holder, Commit(4, "k", 5, b"mine"))
    refused = last(holder, 4)
    assert type(refused) is Failed and refused.error == "LeaseLost"


def test_a_reclaim_does_not_take_a_lease_another_node_holds(core: LoaderCore) -> None:
    other = connect(core, "other")
    core.handle(other, Fetch(2, VALUE, "k", True, ()))
    holder = connect(core, "holder", ("k", 5))
    core.handle(holder, Commit(4, "k", 5, b"mine"))
    assert type(last(holder, 4)) is Failed
    core.handle(other, Commit(3, "k", last(other, 2).token, b"theirs"))  # type: ignore[union-attr]
    assert type(last(other, 3)) is Committed


def test_a_reconnecting_node_keeps_the_leases_of_its_old_connection(core: LoaderCore) -> None:
    """The same node on a new connection (its old one not yet timed out) replaces it."""
    old = connect(core, "holder")
    core.handle(old, Fetch(2, VALUE, "k", True, ()))
    token = last(old, 2).token  # type: ignore[union-attr]
    waiter = connect(core, "waiter")
    core.handle(waiter, Fetch(2, VALUE, "k", True, ()))
    core.detach(old)
    core.leave(old)
    assert type(last(waiter, 2)) is Queued  # not passed on: the holder may come back
    new = connect(core, "holder", ("k", token))
    core.handle(new, Commit(3, "k", token, b"v"))
    assert type(last(new, 3)) is Committed
    assert type(last(waiter, 2)) is Found


def committed_then_deleted(core: LoaderCore, holder: Peer, deleter: Peer) -> int:
    """``holder`` computes ``k`` and commits; its connection is cut before it reads the
    answer; ``deleter`` deletes ``k``. The lease's token."""
    core.handle(holder, Fetch(2, VALUE, "k", True, ()))
    token: int = last(holder, 2).token  # type: ignore[union-attr]
    core.handle(holder, Commit(3, "k", token, b"v"))
    assert type(last(holder, 3)) is Committed
    core.detach(holder)
    core.leave(holder)
    core.handle(deleter, Delete(2, VALUE, "k"))
    return token


def test_a_commit_sent_again_after_a_delete_is_not_stored_again(
    core: LoaderCore, clock: Clock
) -> None:
    """The holder's connection is cut before the answer; the key is deleted; the commit
    sent again on a new connection gets the first answer, and the key stays deleted."""
    old, deleter, other = connect(core, "holder"), connect(core, "deleter"), connect(core, "other")
    token = committed_then_deleted(core, old, deleter)
    first = last(old, 3)
    deleted = last(deleter, 2)
    assert type(first) is Committed
    assert type(deleted) is Deleted and deleted.version == first.entry.version + 1
    clock.run(1.0)
    seen = len(pushed(other))
    new = connect(core, "holder", ("k", token))  # its get still waits: it reclaims the lease
    core.handle(new, Commit(3, "k", token, b"v"))
    again = last(new, 3)
    assert type(again) is Committed and again.entry.version == first.entry.version
    assert (VALUE, "k") not in core.entries and core.status()["computing"] == []
    core.handle(new, History(4, VALUE, "k"))
    history = last(new, 4)
    assert type(history) is HistoryReply
    assert [(e.version, e.origin) for e in history.entries] == [(1, "holder"), (2, "deleter")]
    clock.run(2.0)
    assert not [m for m in pushed(other)[seen:] if type(m) is Load]


def test_a_commit_without_a_lease_of_a_key_never_stored_is_taken(core: LoaderCore) -> None:
    """Nobody holds the key's lease (the loader restarted while fn ran): stored as before."""
    holder = connect(core, "holder")
    core.handle(holder, Commit(3, "k", 12345, b"v"))
    committed = last(holder, 3)
    assert type(committed) is Committed and committed.entry.version == 1
    assert bytes(core.entries[(VALUE, "k")].payload) == b"v"


def test_a_commit_under_token_0_is_not_taken_for_one_sent_again(core: LoaderCore) -> None:
    """0 is the token of a lease kept without its own: it names no one commit."""
    holder, deleter = connect(core, "holder"), connect(core, "deleter")
    core.handle(holder, Commit(3, "k", 0, b"v"))
    core.handle(deleter, Delete(2, VALUE, "k"))
    core.handle(holder, Commit(4, "k", 0, b"w"))
    committed = last(holder, 4)
    assert type(committed) is Committed and committed.entry.version == 3


def test_a_commit_sent_again_after_more_commits_than_remembered_is_not_stored(
    core: LoaderCore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record of commits is bounded; past it, the lease the commit names is known to
    have ended here all the same: refused, and the delete stands."""
    monkeypatch.setattr(loader, "COMMITS_KEPT", 8)
    old, deleter, busy = connect(core, "holder"), connect(core, "deleter"), connect(core, "busy")
    token = committed_then_deleted(core, old, deleter)
    for number in range(10, 40, 2):  # other misses while the holder reconnects
        core.handle(busy, Fetch(number, VALUE, f"o{number}", True, ()))
        core.handle(busy, Commit(number + 1, f"o{number}", last(busy, number).token, b"x"))  # type: ignore[union-attr]
    new = connect(core, "holder", ("k", token))
    core.handle(new, Commit(3, "k", token, b"v"))
    assert type(last(new, 3)) is Failed
    assert (VALUE, "k") not in core.entries and core.status()["computing"] == []


def test_a_late_commit_of_a_lease_that_passed_on_is_refused_after_a_delete(
    core: LoaderCore,
) -> None:
    """A is cut off; its lease passes to B, who stores the value; the key is deleted; A,
    back with its fn done, neither takes the lease back nor stores a second value."""
    a, b, deleter = connect(core, "a"), connect(core, "b"), connect(core, "deleter")
    core.handle(a, Fetch(2, VALUE, "k", True, ()))
    token = last(a, 2).token  # type: ignore[union-attr]
    core.handle(b, Fetch(2, VALUE, "k", True, ()))
    core.leave(a)
    core.handle(b, Commit(3, "k", last(b, 2).token, b"from b"))  # type: ignore[union-attr]
    core.handle(deleter, Delete(2, VALUE, "k"))
    back = connect(core, "a", ("k", token))
    assert core.status()["computing"] == []
    core.handle(back, Commit(3, "k", token, b"from a"))
    refused = last(back, 3)
    assert type(refused) is Failed and refused.error == "LeaseLost"
    assert (VALUE, "k") not in core.entries


def test_a_commit_sent_again_leaves_the_next_holder_of_its_key_alone(
    core: LoaderCore,
) -> None:
    """After the delete another node computes the key: the first holder's commit sent again
    gets its first answer, and the new holder's lease, and its waiter, go on."""
    a, b, c, deleter = (connect(core, name) for name in ("a", "b", "c", "deleter"))
    token = committed_then_deleted(core, a, deleter)
    core.handle(b, Fetch(2, VALUE, "k", True, ()))
    core.handle(c, Fetch(2, VALUE, "k", True, ()))
    back = connect(core, "a", ("k", token))
    core.handle(back, Commit(3, "k", token, b"v"))
    assert last(back, 3).entry.version == 1  # type: ignore[union-attr]
    assert [lease["holder"] for lease in core.status()["computing"]] == ["b"]
    core.handle(b, Commit(3, "k", last(b, 2).token, b"w"))  # type: ignore[union-attr]
    assert type(last(c, 2)) is Found and last(c, 2).entry.version == 3  # type: ignore[union-attr]


def test_a_reconnecting_node_that_no_longer_computes_passes_the_lease_on(
    core: LoaderCore,
) -> None:
    old = connect(core, "holder")
    core.handle(old, Fetch(2, VALUE, "k", True, ()))
    waiter = connect(core, "waiter")
    core.handle(waiter, Fetch(2, VALUE, "k", True, ()))
    core.detach(old)
    core.leave(old)
    connect(core, "holder")
    assert type(last(waiter, 2)) is LeaseGranted


@pytest.mark.parametrize(
    "leases",
    [("k",), (("k",),), (("k", "5"),), ((5, 5),), (("k\udcff", 5),), ((["k"], 5),)],
)
def test_a_malformed_reclaim_claims_nothing(core: LoaderCore, leases: Any) -> None:
    holder = Peer("holder")
    core.join(holder)
    core.handle(holder, Reclaim(leases))
    assert core.status()["computing"] == []


def test_an_await_after_the_holders_reclaim_needs_not_its_resync(core: LoaderCore) -> None:
    """The holder said it computes nothing: a waiter asking before its Sync is answered."""
    holder = Peer("holder")
    core.join(holder)
    core.handle(holder, Reclaim(()))
    waiter = connect(core, "waiter")
    core.handle(waiter, Await(2, "k", (), "holder"))
    assert type(last(waiter, 2)) is LeaseGranted


def test_each_kept_key_waits_its_own_grace(core: LoaderCore, clock: Clock) -> None:
    first, second = connect(core, "first"), connect(core, "second")
    core.handle(first, Await(2, "k1", (), "gone"))
    core.handle(second, Await(2, "k2", (), "late"))
    clock.calls[-1] = (GRACE + 5, clock.calls[-1][1])  # k2's grace began 5 s later
    clock.run(GRACE)
    assert type(last(first, 2)) is LeaseGranted
    assert type(last(second, 2)) is Queued
    late = connect(core, "late", ("k2", 7))
    core.handle(late, Commit(3, "k2", 7, b"v"))
    assert type(last(late, 3)) is Committed and type(last(second, 2)) is Found


def test_a_lease_passing_on_tells_the_others_who_computes_now(core: LoaderCore) -> None:
    """So that a waiter cut off later names the node that computes, not the first one."""
    first, second, third = (connect(core, name) for name in ("first", "second", "third"))
    core.handle(first, Fetch(2, VALUE, "k", True, ()))
    core.handle(second, Fetch(2, VALUE, "k", True, ()))
    core.handle(third, Fetch(2, VALUE, "k", True, ()))
    core.handle(first, Release(0, "k", "ValueError: boom"))
    assert type(last(second, 2)) is LeaseGranted
    queued = last(third, 2)
    assert type(queued) is Queued and queued.holder == "second"


def test_a_connection_reclaims_once(core: LoaderCore) -> None:
    holder = connect(core, "holder")
    core.handle(holder, Reclaim((("k", 5),)))
    assert core.status()["computing"] == []


def test_one_connection_keeps_a_bounded_number_of_keys(core: LoaderCore) -> None:
    from clustorage.loader import KEPT_PER_ASKER

    asker = connect(core, "asker")
    for rid in range(KEPT_PER_ASKER):
        core.handle(asker, Await(rid + 2, f"k{rid}", (), f"nobody{rid}"))
    core.handle(asker, Await(1, "one-more", (), "nobody"))
    assert type(last(asker, 1)) is LeaseGranted
    assert len(core.status()["leases"]) == KEPT_PER_ASKER + 1


class Book:
    """A lease book a standby that takes over finds (as clustorage.pgstore keeps it)."""

    ends_with_value = True  # a value stored ends its lease's record too

    def __init__(self, *leases: tuple[str, str, int]) -> None:
        self.kept = {key: (holder, token) for key, holder, token in leases}

    def lease_granted(self, key: str, holder: str, token: int) -> None:
        self.kept[key] = (holder, token)

    def lease_ended(self, key: str) -> None:
        self.kept.pop(key, None)

    def leases(self) -> list[tuple[str, str, int]]:
        return [(key, holder, token) for key, (holder, token) in self.kept.items()]


def test_a_takeover_keeps_each_adopted_lease_no_longer_than_its_grace(clock: Clock) -> None:
    """Adopted leases wait for their holders until the takeover's grace ends; a key kept
    later (an Await, a connection replaced) keeps its own grace."""
    core = LoaderCore("app1", MemoryStore(), clock, book=Book(("k1", "gone", 5)), lease_grace=GRACE)
    first = connect(core, "first")
    core.handle(first, Fetch(2, VALUE, "k1", True, ()))
    assert type(last(first, 2)) is Queued
    clock.run(GRACE - 5)
    second = connect(core, "second")
    core.handle(second, Await(2, "k2", (), "late"))
    clock.run(GRACE)
    assert type(last(first, 2)) is LeaseGranted
    assert type(last(second, 2)) is Queued
    clock.run(2 * GRACE - 5)
    assert type(last(second, 2)) is LeaseGranted


def test_a_restarted_loader_keeps_no_lease_of_its_own_node(clock: Clock) -> None:
    """The loader's own fn ended with its process: that key is free at once."""
    book = Book(("mine", "app1", 5), ("theirs", "member", 6))
    core = LoaderCore("app1", MemoryStore(), clock, book=book, lease_grace=GRACE)
    asker = connect(core, "asker")
    core.handle(asker, Fetch(2, VALUE, "mine", True, ()))
    core.handle(asker, Fetch(3, VALUE, "theirs", True, ()))
    assert type(last(asker, 2)) is LeaseGranted
    assert type(last(asker, 3)) is Queued


def test_a_lease_found_ended_is_taken_off_the_book(clock: Clock) -> None:
    """A lease whose key has a value (its end was not recorded), or of the loader's own
    node, is not kept, and the book forgets it: a later restart does not find it again."""
    store = MemoryStore()
    first = LoaderCore("app1", store, clock, lease_grace=GRACE)
    holder = connect(first, "holder")
    first.handle(holder, Fetch(2, VALUE, "k", True, ()))
    first.handle(holder, Commit(3, "k", last(holder, 2).token, b"v"))  # type: ignore[union-attr]
    book = Book(("k", "holder", 5), ("mine", "app1", 6), ("theirs", "member", 7))
    LoaderCore("app1", store, clock, book=book, lease_grace=GRACE)
    assert book.leases() == [("theirs", "member", 7)]


def test_a_holder_cut_off_with_nobody_waiting_takes_its_lease_back_and_commits(
    core: LoaderCore,
) -> None:
    """The loader saw the cut first (no grace: nobody waited), so the lease ended; the
    holder, still computing, names it on its new connection and keeps it: another node's
    get waits, and the holder's commit is stored."""
    old = connect(core, "holder")
    core.handle(old, Fetch(2, VALUE, "k", True, ()))
    token = last(old, 2).token  # type: ignore[union-attr]
    core.leave(old)
    new = connect(core, "holder", ("k", token))
    other = connect(core, "other")
    core.handle(other, Fetch(2, VALUE, "k", True, ()))
    assert type(last(other, 2)) is Queued
    core.handle(new, Commit(3, "k", token, b"v"))
    assert type(last(new, 3)) is Committed and type(last(other, 2)) is Found


def test_a_key_kept_by_an_await_goes_to_its_holder_with_its_own_token(core: LoaderCore) -> None:
    """The waiter's connection drops, then the holder's (the lease ends: nobody waits); the
    waiter, back, asks again naming the holder (the key is kept for it, token unknown); the
    holder, back with its token, keeps the key and stores its value for the waiter."""
    holder, waiter = connect(core, "h"), connect(core, "w")
    core.handle(holder, Fetch(2, VALUE, "k", True, ()))
    token = last(holder, 2).token  # type: ignore[union-attr]
    core.handle(waiter, Fetch(2, VALUE, "k", True, ()))
    core.leave(waiter)
    core.leave(holder)
    waiter = connect(core, "w")
    core.handle(waiter, Await(2, "k", (), "h"))
    holder = connect(core, "h", ("k", token))
    assert type(last(waiter, 2)) is Queued
    core.handle(holder, Commit(3, "k", token, b"from h"))
    assert type(last(holder, 3)) is Committed and type(last(waiter, 2)) is Found


def test_a_lease_kept_past_its_grace_with_nobody_waiting_may_still_commit(clock: Clock) -> None:
    core = LoaderCore("app1", MemoryStore(), clock, lease_grace=GRACE)
    old = connect(core, "a")
    core.handle(old, Fetch(2, VALUE, "k", True, ()))
    token = last(old, 2).token  # type: ignore[union-attr]
    core.detach(old)
    core.leave(old)
    clock.run(GRACE)
    back = connect(core, "a", ("k", token))
    core.handle(back, Commit(3, "k", token, b"v"))
    assert type(last(back, 3)) is Committed


def test_an_adopted_lease_that_passed_on_does_not_store_after_a_delete(clock: Clock) -> None:
    """A takeover adopts a's lease; a is late, b computes and stores, the key is deleted;
    a, back with its value, neither takes the lease back nor undoes the delete. An adopted
    lease that did not pass on still takes its holder's value."""
    core = LoaderCore("app1", MemoryStore(), clock, book=Book(("k", "a", 5)), lease_grace=GRACE)
    b, deleter = connect(core, "b"), connect(core, "deleter")
    core.handle(b, Fetch(2, VALUE, "k", True, ()))
    clock.run(GRACE)
    core.handle(b, Commit(3, "k", last(b, 2).token, b"from b"))  # type: ignore[union-attr]
    assert type(last(b, 3)) is Committed
    core.handle(deleter, Delete(2, VALUE, "k"))
    a = connect(core, "a", ("k", 5))
    assert core.status()["computing"] == []
    core.handle(a, Commit(3, "k", 5, b"from a"))
    assert type(last(a, 3)) is Failed and (VALUE, "k") not in core.entries
    unchanged = LoaderCore("app1", MemoryStore(), Clock(), book=Book(("k", "a", 5)))
    back = connect(unchanged, "a", ("k", 5))
    unchanged.handle(back, Commit(3, "k", 5, b"from a"))
    assert type(last(back, 3)) is Committed


def test_a_commit_stored_without_a_lease_is_not_held_again_after_a_delete(
    core: LoaderCore,
) -> None:
    """A restarted loader takes h's commit without a lease; its answer is cut off, the key
    deleted; h, back, names that lease again: the key is not held for it, its commit sent
    again gets its first answer, and the next get computes."""
    deleter, other = connect(core, "deleter"), connect(core, "other")
    holder = connect(core, "h")
    core.handle(holder, Commit(3, "k", 77, b"from h"))
    assert type(last(holder, 3)) is Committed
    core.detach(holder)
    core.leave(holder)
    core.handle(deleter, Delete(2, VALUE, "k"))
    back = connect(core, "h", ("k", 77))
    assert core.status()["computing"] == []
    core.handle(back, Commit(3, "k", 77, b"from h"))
    assert last(back, 3).entry.version == 1  # type: ignore[union-attr]
    core.handle(other, Fetch(2, VALUE, "k", True, ()))
    assert type(last(other, 2)) is LeaseGranted and (VALUE, "k") not in core.entries


@pytest.mark.parametrize("ended_by", ["the waiter", "a put"])
def test_a_key_kept_by_an_await_and_lost_is_not_stored_again_after_a_delete(
    core: LoaderCore, clock: Clock, ended_by: str
) -> None:
    """A restarted loader keeps k for h on a waiter's Await, not knowing h's token; the
    waiter computes k once the grace is over (or a put stores it), and k is deleted; h,
    back with its value, neither takes k back nor stores it over the delete."""
    waiter, other = connect(core, "w"), connect(core, "x")
    core.handle(waiter, Await(2, "k", (), "h"))
    if ended_by == "a put":
        core.handle(other, Put(2, "k", b"put by x"))
    else:
        clock.run(GRACE)
        core.handle(waiter, Commit(3, "k", last(waiter, 2).token, b"from w"))  # type: ignore[union-attr]
    assert type(last(waiter, 2)) in (Found, LeaseGranted)
    core.handle(other, Delete(3, VALUE, "k"))
    back = connect(core, "h", ("k", 77))
    assert core.status()["computing"] == []
    core.handle(back, Commit(3, "k", 77, b"from h"))
    assert type(last(back, 3)) is Failed and (VALUE, "k") not in core.entries


@pytest.mark.parametrize("filled_by", ["another node's fn", "a put"])
def test_a_lease_let_go_is_not_taken_back_once_its_key_was_stored_and_deleted(
    core: LoaderCore, filled_by: str
) -> None:
    """a is cut off with nobody waiting (its lease ends, not lost); then k gets a value from
    elsewhere, and is deleted; a, back, neither takes k back nor stores over the delete."""
    a, b, deleter = connect(core, "a"), connect(core, "b"), connect(core, "deleter")
    core.handle(a, Fetch(2, VALUE, "k", True, ()))
    token = last(a, 2).token  # type: ignore[union-attr]
    core.leave(a)
    if filled_by == "a put":
        core.handle(b, Put(2, "k", b"put by b"))
    else:
        core.handle(b, Fetch(2, VALUE, "k", True, ()))
        core.handle(b, Commit(3, "k", last(b, 2).token, b"from b"))  # type: ignore[union-attr]
    core.handle(deleter, Delete(2, VALUE, "k"))
    back = connect(core, "a", ("k", token))
    assert core.status()["computing"] == []
    core.handle(back, Commit(3, "k", token, b"from a"))
    assert type(last(back, 3)) is Failed and (VALUE, "k") not in core.entries


def test_a_node_without_reclaim_asking_for_a_key_kept_for_it_gets_a_real_token(
    core: LoaderCore,
) -> None:
    """A node of an earlier release (no Reclaim) asks for a key an Await kept for it: it gets
    the lease under a token of this loader, not 0, and commits under it after a cut."""
    waiter, deleter = connect(core, "w"), connect(core, "deleter")
    core.handle(waiter, Await(2, "k", (), "h"))
    core.handle(deleter, Put(2, "k", b"put"))
    core.handle(deleter, Delete(3, VALUE, "k"))
    again = connect(core, "w2")
    core.handle(again, Await(2, "k", (), "h"))
    old = Peer("h")
    core.join(old)
    core.handle(old, Sync(1, {}))
    core.handle(old, Fetch(5, VALUE, "k", True, ()))
    granted = last(old, 5)
    assert type(granted) is LeaseGranted and granted.token != 0
    core.handle(again, Release(2, "k", ""))
    core.leave(old)
    back = Peer("h")
    core.join(back)
    core.handle(back, Sync(1, {}))
    core.handle(back, Commit(6, "k", granted.token, b"from h"))
    assert type(last(back, 6)) is Committed


class HeldWrites:
    """The loader's writes, each held until the test lets it succeed or fail (a full disk)."""

    off_loop_from = INLINE_LIMIT + 1  # as the loader's own writer on a local store

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.here = WriteHere(store)
        self.pending: list[tuple[Callable[[], None], Callable[[], None]]] = []

    def commit(self, entry: Any, previous: int, done: Any) -> None:
        self.pending.append(
            (
                lambda: self.here.commit(entry, previous, done),
                lambda: done(None, StoreError("disk full")),
            )
        )

    def delete(self, kind: str, key: str, version: int, origin: str, done: Any) -> None:
        self.pending.append(
            (
                lambda: self.here.delete(kind, key, version, origin, done),
                lambda: done(StoreError("disk full")),
            )
        )

    def finish(self, ok: bool = True) -> None:
        good, bad = self.pending.pop(0)
        (good if ok else bad)()


def test_a_holder_whose_commit_failed_while_cut_off_may_commit_again(clock: Clock) -> None:
    """h commits, is cut off, and the write fails: nothing changed k, so h's lease, let go
    with nobody waiting, is h's again, and its commit sent again is stored."""
    writes = HeldWrites(MemoryStore())
    core = LoaderCore("app1", writes.store, clock, lease_grace=GRACE, writes=writes)  # type: ignore[arg-type]
    holder = connect(core, "h")
    core.handle(holder, Fetch(2, VALUE, "k", True, ()))
    token = last(holder, 2).token  # type: ignore[union-attr]
    core.handle(holder, Commit(3, "k", token, b"v"))
    core.leave(holder)
    writes.finish(ok=False)
    back = connect(core, "h", ("k", token))
    assert [lease["holder"] for lease in core.status()["computing"]] == ["h"]
    core.handle(back, Commit(3, "k", token, b"v"))
    writes.finish()
    assert type(last(back, 3)) is Committed


def test_requests_behind_a_write_are_told_to_wait_and_the_next_write_keeps_telling(
    clock: Clock,
) -> None:
    """Requests parked behind a slow write are told Queued, naming nobody (a write is no
    lease); when the write ends and one of them writes again, the rest are still told."""
    writes = HeldWrites(MemoryStore())
    core = LoaderCore("app1", writes.store, clock, writes=writes)  # type: ignore[arg-type]
    a, b, c = connect(core, "a"), connect(core, "b"), connect(core, "c")
    core.handle(a, Put(2, "k", b"1"))  # write 1, held
    core.handle(b, Put(2, "k", b"2"))
    core.handle(c, Fetch(2, VALUE, "k", True, ()))
    writes.finish()  # write 1 ends at once; b's put is write 2, held
    assert type(last(a, 2)) is Committed and b.answers(2) == c.answers(2) == []
    clock.run(100.0)
    assert b.answers(2) == []  # the writer of a small value: its write is quick
    told = c.answers(2)
    assert [(type(m), m.holder) for m in told] == [(Queued, "")]  # type: ignore[union-attr]


def test_a_big_write_answered_before_its_writer_is_told_tells_it_nothing(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big put's writer is told to wait only while its write is on its way: once
    answered, a Queued for it never follows the answer, even from a timer that runs
    though cancelled (here: cancel does nothing)."""
    monkeypatch.setattr(_Timer, "cancel", lambda self: None)
    writes = HeldWrites(MemoryStore())
    core = LoaderCore("app1", writes.store, clock, writes=writes)  # type: ignore[arg-type]
    writer = connect(core, "w")
    core.handle(writer, Put(2, "big", b"x" * (70 << 10)))
    writes.finish()
    clock.run(100.0)
    assert [type(m) for m in writer.answers(2)] == [Committed]


def test_on_a_store_written_off_the_loop_every_slow_write_tells_its_writer(
    clock: Clock,
) -> None:
    """Where every write leaves the loop (a store across the network: PostgreSQL), a small
    put or a delete that is slow to be written tells its writer to wait on, as a big one
    does; on the loop's own store a small write never needs to."""
    writes = HeldWrites(MemoryStore())
    writes.off_loop_from = 0
    core = LoaderCore("app1", writes.store, clock, writes=writes)  # type: ignore[arg-type]
    writer = connect(core, "w")
    core.handle(writer, Put(2, "k", b"1"))
    writes.finish()
    core.handle(writer, Delete(3, VALUE, "k"))
    core.handle(writer, Put(4, "j", b"2"))
    clock.run(100.0)
    assert [type(m) for m in writer.answers(3)] == [Queued]
    assert [type(m) for m in writer.answers(4)] == [Queued]
    writes.finish()
    writes.finish()
    assert [type(m) for m in writer.answers(3)] == [Queued, Deleted]
    assert [type(m) for m in writer.answers(4)] == [Queued, Committed]
    assert [type(m) for m in writer.answers(2)] == [Committed]  # answered before: not told


def test_an_await_that_names_nobody_keeps_no_key(clock: Clock) -> None:
    """An Await naming no holder (a node that waited behind a write, which nobody holds)
    keeps the key for nobody: it is a Fetch, and the asker gets the lease at once."""
    core = LoaderCore("app1", MemoryStore(), clock, lease_grace=GRACE)
    asker, other = connect(core, "a"), connect(core, "b")
    core.handle(asker, Await(2, "k", (), ""))
    assert type(last(asker, 2)) is LeaseGranted
    core.handle(other, Fetch(2, VALUE, "k", True, ()))
    assert [(type(m), m.holder) for m in other.answers(2)] == [(Queued, "a")]  # type: ignore[union-attr]
