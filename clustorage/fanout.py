"""Pushes to every connected node, off the request path. No I/O.

A request's answer goes out at once; what every other node must hear of it (a hot-load, a
deletion, who joined) waits in a queue. A *pass* takes everything queued, encodes it once as
one ``Pushes`` frame, and hands that frame to every peer, a few peers at a time, handing the
loop back between slices so that requests keep being answered (SPEC "The loader never
stalls"). What is queued during a pass goes in the next one, so under a burst of writes a
node receives one frame per pass, not one per write, and membership news is one delta per
pass, not the whole list per join: joining N nodes costs O(N) frames, not O(N²).

Passes are paced: the next one begins PACE after the one before began, at the soonest, and
a pass that needed more than one slice (hundreds of peers) is followed by a rest as long as
it spent delivering. A change after a quiet moment goes out at once; under a stream of
writes, every node gets one frame per PACE carrying all of them, not one frame per write
that it must read and check, and the fan-out takes at most half of the loop's time however
fast changes come. A definition is waited for (its author counts the acknowledgements): its
pass begins as it is pushed, cutting a rest short, unless a pass is under way. Membership
news is not held back by PACE (a node that joins is seen by the others at once), only by a
rest.

Coalescing: a replica applies only a newer version of a key (SPEC "Replicas converge"), so
of the changes of one entry queued for a pass only the newest goes out; a node hears of the
versions it would have overwritten at once only when they came in different passes. A
definition, which every node acknowledges, is never left out.

Order: a node may now hear of a change after it heard of a newer one (a request's answer
goes first). Every change carries its version, and replicas apply only newer ones, so this
reorders nothing that is kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from .messages import (
    Announce,
    Load,
    Members,
    Message,
    Payload,
    Pushes,
    Unload,
    encode,
    encode_parts,
)

__all__ = ["PACE", "SLICE", "Fanout"]

log = logging.getLogger(__name__)

SLICE = 0.0005  # seconds of delivering before the loop is handed back
PACE = 0.005  # seconds from the beginning of a pass to the beginning of the next, at least
_PUSH_OVERHEAD = 16  # bytes a push takes inside a Pushes frame besides its own, at most
_FRAME_ROOM = 1024  # bytes of a frame's limit kept for its header and the Pushes around


def _changed(message: Message) -> tuple[tuple[str, str], int] | None:
    """The entry a push changes and its version, if a newer change of it may replace it:
    not a definition (its nodes acknowledge that version), nor membership news."""
    if type(message) is Load:
        entry = None if message.ack else message.entry
    elif type(message) is Announce:
        entry = message.entry
    elif type(message) is Unload:
        return (message.kind, message.key), message.version
    else:
        entry = None
    return None if entry is None else ((entry.kind, entry.key), entry.version)


class Fanout:
    """The queue of pushes and the passes that deliver them.

    Args:
        peers: the peers to deliver to now (remote ones; the loader's own node is told
            directly), each with ``deliver(message, parts)`` and ``close()``.
        later: runs a function on the loop once it has served what is ready.
        after: runs a function on the loop in so many seconds (without it, no rest).
        limit: the most bytes one frame may carry: a pass of more goes in several frames.
    """

    def __init__(
        self,
        peers: Callable[[], Iterable[Any]],
        later: Callable[[Callable[[], None]], object],
        after: Callable[[float, Callable[[], None]], object] | None = None,
        limit: int = 1 << 30,
    ) -> None:
        self._peers = peers
        self._limit = limit
        self._later = later
        self._after = after
        self._spent = 0.0  # seconds the pass under way spent delivering
        self._resting = False  # the coming pass waits for the end of a rest
        self._turn = 0  # passes scheduled so far
        self._rest_until = 0.0  # no pass begins before this (see the module docstring)
        self._paced_until = 0.0  # nor, unless it brings membership news, before this
        # What the coming pass sends, in order: a replaceable change under its entry's
        # (kind, key), anything else under a number of its own.
        self._queued: dict[object, tuple[int, Message]] = {}
        self._numbers = 0
        self._skip: set[int] = set()  # ids of the peers the queued pushes came from
        self._joined: dict[str, bool] = {}  # name -> connected, since the last pass
        self._pass: list[Any] | None = None  # peers this pass has yet to reach
        self._urgent = False  # something queued is waited for: the next pass may not rest
        self._frames: list[tuple[Message, tuple[bytes, Payload]]] = []  # this pass's

    def push(self, message: Message, skip: Any = None, *, urgent: bool = False) -> None:
        """Deliver ``message`` to every peer in a coming pass (``skip``, the peer whose
        request made it, already has it: it is left out of a pass whose every push is
        from it, as a lone writer's are). An ``urgent`` one, which someone waits for
        (a definition to acknowledge), goes out at once unless a pass is under way, cutting
        a rest short. A change of an entry replaces an older one of it still queued (see
        the module docstring)."""
        self._enqueue(message)
        self._skip.add(id(skip))
        self._urgent = self._urgent or urgent
        self._start(urgent, at_once=urgent)

    def membership(self, name: str, connected: bool) -> None:
        """Tell every peer, in a coming pass, that ``name`` joined or left (not held back
        by PACE: a node that joins is seen at once, but for a rest)."""
        self._joined[name] = connected
        self._start(paced=False)

    def _enqueue(self, message: Message) -> None:
        queued = self._queued
        changed = _changed(message)
        self._numbers += 1
        if changed is None:
            queued[self._numbers] = (0, message)
            return
        where, version = changed
        held = queued.get(where)
        if held is None or held[0] <= version:  # else a newer one is queued: it stays
            queued.pop(where, None)  # the newer goes where it belongs in order
            queued[where] = (version, message)

    @property
    def idle(self) -> bool:
        return self._pass is None and not self._queued and not self._joined

    def _start(self, urgent: bool = False, paced: bool = True, at_once: bool = False) -> None:
        """Schedule the coming pass unless one is under way; ``at_once``: begin it now
        instead (a definition goes out before the loop comes round)."""
        scheduled = self._pass == [] and not self._frames  # not yet begun: no frames
        if (
            self._pass is None
            or (at_once and scheduled)
            or (self._resting and (urgent or not paced))
        ):
            self._pass = []
            self._turn += 1
            turn = self._turn
            until = max(self._rest_until, self._paced_until) if paced else self._rest_until
            rest = until - time.monotonic()
            after = self._after
            self._resting = rest > 0 and after is not None and not urgent
            if after is not None and self._resting:
                after(rest, lambda: self._begin(turn))
            elif at_once:
                self._begin(turn)
            else:
                self._later(lambda: self._begin(turn))

    def _begin(self, turn: int) -> None:
        if turn != self._turn:  # it began sooner: a rest cut short, or at once
            return
        self._resting = False
        if self._joined:
            news, self._joined = self._joined, {}
            present = tuple(sorted(name for name, on in news.items() if on))
            gone = tuple(sorted(name for name, on in news.items() if not on))
            self._enqueue(Members(present, gone))
            self._skip.add(id(None))
        queued = [message for _, message in self._queued.values()]
        skip = next(iter(self._skip)) if len(self._skip) == 1 else id(None)
        self._queued, self._skip, self._urgent = {}, set(), False
        peers = [peer for peer in self._peers() if id(peer) != skip]
        if not queued or not peers:  # nobody to tell (a lone writer's own writes): not encoded
            self._pass = None
            return
        self._frames = self._encoded(queued)
        self._pass = peers
        self._pass.reverse()  # popped from the end: in the peers' order
        self._spent = 0.0
        self._paced_until = time.monotonic() + PACE
        self._deliver()

    def _encoded(self, queued: list[Message]) -> list[tuple[Message, tuple[bytes, Payload]]]:
        """The frames of a pass, encoded once: a push alone as it is, several in a Pushes
        frame, as many frames as it takes for none to be over the limit (each push fits
        in a frame of its own: the loader stores nothing that does not)."""
        if len(queued) == 1:  # as it is: no Pushes around it
            return [(queued[0], encode_parts(queued[0]))]
        batches: list[list[tuple[Message, bytes]]] = [[]]
        size = 0
        for message in queued:
            data = encode(message)
            if batches[-1] and size + len(data) + _PUSH_OVERHEAD > self._limit - _FRAME_ROOM:
                batches.append([])
                size = 0
            batches[-1].append((message, data))
            size += len(data) + _PUSH_OVERHEAD
        frames = []
        for batch in batches:
            framed = batch[0][0] if len(batch) == 1 else Pushes(tuple(data for _, data in batch))
            frames.append((framed, encode_parts(framed)))
        return frames

    def _deliver(self) -> None:
        peers, frames = self._pass, self._frames
        assert peers is not None and frames
        began = time.monotonic()
        stop = began + SLICE
        while peers:
            peer = peers.pop()
            try:
                for message, parts in frames:
                    peer.deliver(message, parts)
            except Exception:  # a bug: this peer is not told, so it resyncs; the others are
                log.exception("could not push to %s; it is closed", getattr(peer, "name", peer))
                peer.close()
            if (now := time.monotonic()) > stop and peers:
                self._spent += now - began
                self._later(self._deliver)
                return
        now = time.monotonic()
        self._spent += now - began
        if self._spent > SLICE:
            self._rest_until = now + self._spent
        self._frames = []
        self._pass = None
        if self._queued or self._joined:  # a definition pushed during the pass: no rest
            self._start(self._urgent, paced=not self._joined)
