"""The fan-out: pushes queued, encoded once per pass, delivered a slice at a time; a pass
of one push sends it as it is, several go in one Pushes frame; of one entry's changes only
the newest goes; passes are paced, and a long pass is followed by a rest."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import clustorage.fanout as fanout_module
from clustorage.fanout import PACE, SLICE, Fanout
from clustorage.messages import (
    FUNCTION,
    VALUE,
    Announce,
    Entry,
    Load,
    Members,
    Pushes,
    Unload,
    decode,
    encode,
)


class Peer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.frames: list[Pushes] = []
        self.parts: list[Any] = []
        self.closed = False

    def deliver(self, message: Any, parts: Any = None) -> None:
        self.frames.append(message)
        self.parts.append(parts)

    def close(self) -> None:
        self.closed = True

    def heard(self) -> list[Any]:
        """Every push, out of the Pushes frames that carried several."""
        heard: list[Any] = []
        for message in self.frames:
            if isinstance(message, Pushes):
                heard += [decode(frame) for frame in message.frames]
            else:
                heard.append(message)
        return heard


class Loop:
    """Runs what the fan-out schedules when told to, as the loader's loop would."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []

    def later(self, call: Callable[[], None]) -> None:
        self.calls.append(call)

    def run(self) -> None:
        while self.calls:
            self.calls.pop(0)()


def entry(key: str, version: int, kind: str = VALUE) -> Entry:
    return Entry(kind, key, version, b"\x80\x05K\x01.", None, "w", 1.0)


def test_pushes_queued_before_a_pass_go_out_in_one_frame_encoded_once() -> None:
    """Three pushes before the loop comes round: each peer gets one frame, the same parts."""
    peers = [Peer("a"), Peer("b")]
    loop = Loop()
    fanout = Fanout(lambda: peers, loop.later)
    messages = [Load(entry("k", 1), False), Load(entry("j", 2), False), Unload(VALUE, "i", 3, "w")]
    for message in messages:
        fanout.push(message)
    loop.run()
    for peer in peers:
        assert len(peer.frames) == 1 and peer.heard() == messages
    assert peers[0].parts[0] is peers[1].parts[0]
    assert fanout.idle


def test_of_one_entrys_changes_in_a_pass_only_the_newest_goes_out() -> None:
    """Bytes in, bytes out: puts, a big value's announcement and a deletion of one key
    queued in any order leave the newest, in the place of the last; other keys keep theirs."""
    peer = Peer("a")
    loop = Loop()
    fanout = Fanout(lambda: [peer], loop.later)
    for message in [
        Load(entry("k", 1), False),
        Load(entry("j", 1), False),
        Load(entry("k", 3), False),
        Announce(entry("k", 2)._replace(payload=b""), 2 << 20),  # older than 3: left out
        Load(entry("j", 2), False),
        Unload(VALUE, "k", 4, "w"),
        Load(entry("k", 1, FUNCTION), False),  # another kind, another entry
    ]:
        fanout.push(message)
    loop.run()
    (frame,) = peer.frames
    assert isinstance(frame, Pushes)
    assert frame.frames == (
        encode(Load(entry("j", 2), False)),
        encode(Unload(VALUE, "k", 4, "w")),
        encode(Load(entry("k", 1, FUNCTION), False)),
    )


def test_a_definition_is_never_left_out_for_a_newer_change() -> None:
    """Every node acknowledges a definition's version: it goes out, and so does what
    replaced it (a newer definition, a deletion)."""
    peer = Peer("a")
    loop = Loop()
    fanout = Fanout(lambda: [peer], loop.later)
    pushed = [
        Load(entry("f", 1, FUNCTION), True),
        Load(entry("f", 2, FUNCTION), True),
        Unload(FUNCTION, "f", 3, "w"),
    ]
    for message in pushed:
        fanout.push(message, urgent=message is not pushed[-1])
    loop.run()
    assert peer.heard() == pushed


def test_a_pass_whose_every_push_came_from_one_peer_leaves_it_out() -> None:
    """A lone writer does not hear of its own writes again; a mixed pass goes to everyone."""
    writer, other = Peer("w"), Peer("o")
    loop = Loop()
    fanout = Fanout(lambda: [writer, other], loop.later)
    fanout.push(Load(entry("k", 1), False), writer)
    loop.run()
    assert (len(writer.frames), len(other.frames)) == (0, 1)
    fanout.push(Load(entry("k", 2), False), writer)
    fanout.push(Load(entry("j", 1), False), other)
    loop.run()
    assert (len(writer.frames), len(other.frames)) == (1, 2)


def test_a_peer_that_fails_does_not_end_the_pass_nor_the_next(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer whose deliver raises (a bug) is logged and closed, so that it resyncs; the
    peers after it still hear of the change, and the next change goes out too."""

    class Broken(Peer):
        def deliver(self, message: Any, parts: Any = None) -> None:
            raise RuntimeError("the handler is closed")

    first, broken, last = Peer("a"), Broken("b"), Peer("c")
    loop = Loop()
    fanout = Fanout(lambda: [first, broken, last], loop.later)
    fanout.push(Load(entry("k", 1), False))
    loop.run()
    fanout.push(Load(entry("k", 2), False))
    loop.run()
    for peer in (first, last):
        assert [m.entry.version for m in peer.heard()] == [1, 2]
    assert fanout.idle and broken.closed and not first.closed
    assert caplog.text.count("could not push to b; it is closed") == 2


def test_a_pass_over_the_frame_limit_goes_in_several_frames() -> None:
    """Pushes that would make one frame over the limit go in as many as it takes, in order,
    each within the limit, and a peer applies them all."""
    peer = Peer("a")
    loop = Loop()
    fanout = Fanout(lambda: [peer], loop.later, limit=64 << 10)
    big = [Entry(VALUE, f"k{i}", 1, b"x" * (20 << 10), None, "w", 1.0) for i in range(7)]
    for one in big:
        fanout.push(Load(one, False))
    loop.run()
    assert len(peer.frames) > 1
    assert all(len(b"".join(map(bytes, parts))) <= 64 << 10 for parts in peer.parts)
    assert [m.entry.key for m in peer.heard()] == [one.key for one in big]


def test_membership_news_is_one_delta_per_pass() -> None:
    """Joins and leaves between passes: one Members with each name's last state."""
    peer = Peer("a")
    loop = Loop()
    fanout = Fanout(lambda: [peer], loop.later)
    for name in ("n1", "n2", "n3"):
        fanout.membership(name, True)
    fanout.membership("n2", False)
    loop.run()
    assert peer.heard() == [Members(("n1", "n3"), ("n2",))]


def test_pushes_during_a_pass_wait_for_the_next_one() -> None:
    """What is queued while a pass delivers goes in a pass of its own, after it."""
    peers = [Peer(str(i)) for i in range(3)]
    loop = Loop()
    fanout = Fanout(lambda: peers, loop.later)
    fanout.push(Load(entry("k", 1), False))
    loop.calls.pop(0)()  # the pass begins (and, here, ends: three peers fit in a slice)
    fanout.push(Load(entry("k", 2), False))
    loop.run()
    for peer in peers:
        assert [m.entry.version for m in peer.heard()] == [1, 2]
        assert len(peer.frames) == 2


class Clock:
    """A fake ``time.monotonic`` that a slow peer's delivery moves on."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


Rests = list[tuple[float, Callable[[], None]]]
SLOW_PEERS = int(PACE / SLICE) + 1  # a slice each: delivering takes longer than PACE


def slow_fanout(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Clock, list[Peer], Loop, Rests, Fanout]:
    """A fan-out to SLOW_PEERS peers that each take a whole slice to deliver to, on a fake
    clock; the rests it asks for are recorded, not scheduled."""
    clock = Clock()
    monkeypatch.setattr(fanout_module.time, "monotonic", clock)

    class Slow(Peer):
        def deliver(self, message: Any, parts: Any = None) -> None:
            clock.now += SLICE
            super().deliver(message, parts)

    peers: list[Peer] = [Slow(str(i)) for i in range(SLOW_PEERS)]
    loop = Loop()
    rests: Rests = []
    fanout = Fanout(lambda: peers, loop.later, lambda delay, call: rests.append((delay, call)))
    return clock, peers, loop, rests, fanout


def test_a_pass_of_several_slices_is_followed_by_a_rest_as_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Delivering took a slice per peer, longer than PACE: the next pass begins only that
    long after, and carries everything queued meanwhile in one frame; a one-slice pass
    needs no rest but PACE's."""
    clock, peers, loop, rests, fanout = slow_fanout(monkeypatch)
    fanout.push(Load(entry("k", 1), False))
    loop.run()
    assert not rests
    fanout.push(Load(entry("k", 2), False))
    fanout.push(Load(entry("j", 3), False))
    assert loop.calls == [] and len(rests) == 1
    assert rests[0][0] == pytest.approx(SLOW_PEERS * SLICE)
    clock.now += rests[0][0]
    rests.pop()[1]()
    loop.run()
    for peer in peers:
        assert [m.entry.version for m in peer.heard()] == [1, 2, 3]
        assert len(peer.frames) == 2

    quick = [Peer("q")]
    fanout = Fanout(lambda: quick, loop.later, lambda delay, call: rests.append((delay, call)))
    fanout.push(Load(entry("k", 4), False))
    loop.run()
    clock.now += PACE
    fanout.push(Load(entry("k", 5), False))
    loop.run()
    assert not rests and len(quick[0].frames) == 2


def paced_fanout(monkeypatch: pytest.MonkeyPatch) -> tuple[Clock, Peer, Loop, Rests, Fanout]:
    """A fan-out to one peer on a fake clock; the rests it asks for are recorded."""
    clock = Clock()
    monkeypatch.setattr(fanout_module.time, "monotonic", clock)
    peer = Peer("a")
    loop = Loop()
    rests: Rests = []
    fanout = Fanout(lambda: [peer], loop.later, lambda delay, call: rests.append((delay, call)))
    return clock, peer, loop, rests, fanout


def test_passes_are_paced_and_what_comes_meanwhile_goes_in_one_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A change after a quiet moment goes at once; the ones right after it wait until PACE
    after that pass began, then go together."""
    clock, peer, loop, rests, fanout = paced_fanout(monkeypatch)
    fanout.push(Load(entry("k", 1), False))
    loop.run()
    assert len(peer.frames) == 1 and not rests
    clock.now += PACE / 4
    for key in ("a", "b", "c"):
        fanout.push(Load(entry(key, 1), False))
    assert not loop.calls and len(rests) == 1
    assert rests[0][0] == pytest.approx(PACE * 3 / 4)
    clock.now += rests[0][0]
    rests.pop()[1]()
    loop.run()
    assert len(peer.frames) == 2 and [m.entry.key for m in peer.heard()] == ["k", "a", "b", "c"]
    assert fanout.idle


def test_membership_news_is_not_held_back_by_pace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node joining while changes wait for PACE is told at once, with them."""
    _, peer, loop, rests, fanout = paced_fanout(monkeypatch)
    fanout.push(Load(entry("k", 1), False))
    loop.run()
    fanout.push(Load(entry("j", 1), False))
    assert not loop.calls and len(rests) == 1  # waits for PACE
    fanout.membership("b", True)
    loop.run()
    assert len(peer.frames) == 2
    assert {type(message) for message in peer.heard()[1:]} == {Load, Members}
    rests.pop()[1]()  # the paced pass's turn has passed: it begins nothing
    loop.run()
    assert len(peer.frames) == 2 and fanout.idle


def test_an_urgent_push_goes_out_before_the_loop_comes_round() -> None:
    """A definition, which its author waits for, is delivered as it is pushed, with what was
    queued before it; a push after it waits for the loop as usual."""
    peers = [Peer("a"), Peer("b")]
    loop = Loop()
    fanout = Fanout(lambda: peers, loop.later)
    fanout.push(Load(entry("k", 1), False))
    fanout.push(Load(entry("f", 1, FUNCTION), True), urgent=True)
    for peer in peers:
        assert [m.entry.key for m in peer.heard()] == ["k", "f"]
    fanout.push(Load(entry("j", 1), False))
    assert all(len(peer.frames) == 1 for peer in peers)
    loop.run()
    for peer in peers:
        assert [m.entry.key for m in peer.heard()] == ["k", "f", "j"]
    assert fanout.idle


def test_an_urgent_push_as_a_pass_reaches_its_last_peer_goes_in_the_next_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A definition pushed while the last peer of a pass is being delivered to (a push from
    inside that delivery) does not begin a pass inside the one ending: every peer gets the
    pass's frame, then the definition."""
    _, peers, loop, _, fanout = slow_fanout(monkeypatch)
    last = peers[-1]
    delivered = last.deliver

    def deliver_then_define(message: Any, parts: Any = None) -> None:
        delivered(message, parts)
        if len(last.frames) == 1:
            fanout.push(Load(entry("f", 1, FUNCTION), True), urgent=True)

    last.deliver = deliver_then_define  # type: ignore[method-assign]
    fanout.push(Load(entry("k", 1), False))
    loop.run()
    for peer in peers:
        assert [m.entry.key for m in peer.heard()] == ["k", "f"]
    assert fanout.idle


def test_an_urgent_push_cuts_a_rest_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """A definition waited for goes out at once, with what rested; the rest's end then
    begins nothing."""
    _, peers, loop, rests, fanout = slow_fanout(monkeypatch)
    fanout.push(Load(entry("k", 1), False))
    loop.run()
    fanout.push(Load(entry("k", 2), False))
    assert len(rests) == 1 and not loop.calls
    fanout.push(Load(entry("f", 1), True), urgent=True)
    loop.run()
    for peer in peers:
        assert [m.entry.key for m in peer.heard()] == ["k", "k", "f"]
    rests.pop()[1]()
    loop.run()
    assert all(len(peer.frames) == 2 for peer in peers) and fanout.idle


def test_a_definition_pushed_during_a_long_pass_goes_out_after_it_without_a_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An urgent push that comes while a pass of several slices is under way is sent in the
    pass right after it, not after a rest."""
    _, peers, loop, rests, fanout = slow_fanout(monkeypatch)
    fanout.push(Load(entry("k", 1), False))
    loop.calls.pop(0)()  # the pass begins: one peer, then the slice is spent
    assert loop.calls
    fanout.push(Load(entry("f", 1), True), urgent=True)
    loop.run()
    assert not rests
    for peer in peers:
        assert [m.entry.key for m in peer.heard()] == ["k", "f"]
