"""Compute leases: who computes which key, who waits for it, and which waits would deadlock.

No I/O. A lease belongs to one thread of one node (the one whose ``get`` missed), and is
numbered by a token that its Commit must show: a holder whose lease passed on (it was cut
off) is told so instead of storing a second value (SPEC "get" 4). Tokens carry the loader
process's incarnation, so a lease granted after a restart never matches one from before,
and the key's version when the lease was given (see :func:`base_version`): a loader that
restarted, and so forgot which leases a put or a delete ended, still tells a holder whose
key changed since that its value would be a second one, or undo a delete.

A waiter names the keys its thread is computing (``holding``). While it waits, each of
those keys is *blocked on* the key it waits for; a new wait that would lead, through
blocked keys, back to a key its own thread computes closes a cycle (SPEC "get" 4).
"""

from __future__ import annotations

import collections
import itertools
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Lease", "Leases", "Waiter", "base_version"]

# A token: the base version above bit 64, then a flag saying there is one (tokens of an
# earlier release have none), the incarnation (31 bits) and the number (32 bits).
_BASE_SHIFT = 64
_HAS_BASE = 1 << 63
_INCARNATION = 0x7FFF_FFFF


@dataclass(slots=True)
class Waiter:
    """A request queued on a lease: its node, its number, the keys its thread computes."""

    peer: Any
    rid: int
    holding: tuple[str, ...]


@dataclass(slots=True)
class Lease:
    """One key being computed by one thread of ``holder``."""

    key: str
    holder: Any
    rid: int
    token: int
    holding: tuple[str, ...]
    since: float = field(default_factory=time.monotonic)
    waiters: collections.deque[Waiter] = field(default_factory=collections.deque)
    committing: bool = False  # its value is being written: it settles, it does not pass on


class Leases:
    """Every lease of a loader, and the waits between them."""

    def __init__(self, version_of: Callable[[str], int] = lambda key: 0) -> None:
        """``version_of(key)``: the key's last version written (its tombstone's, if it was
        deleted; 0 if never written), which a token given for it carries."""
        self._leases: dict[str, Lease] = {}
        self._blocked: dict[str, str] = {}  # a leased key -> the key its holder waits for
        self._incarnation = secrets.randbits(30) + 1
        self._numbers = itertools.count(1)
        self._version_of = version_of

    def __iter__(self) -> Iterator[Lease]:
        return iter(list(self._leases.values()))

    def get(self, key: str) -> Lease | None:
        return self._leases.get(key)

    def _token(self, key: str) -> int:
        base = self._version_of(key) << _BASE_SHIFT | _HAS_BASE
        return base | (self._incarnation << 32) | (next(self._numbers) & 0xFFFF_FFFF)

    def renumber(self, lease: Lease) -> None:
        """Give ``lease`` (one kept without its token) a token of this process."""
        lease.token = self._token(lease.key)

    def granted_here(self, token: int) -> bool:
        """Whether ``token`` names a lease this process granted (not one from a loader
        before a restart or a takeover)."""
        return (token >> 32) & _INCARNATION == self._incarnation

    def grant(self, key: str, peer: Any, rid: int, holding: tuple[str, ...]) -> Lease:
        """Make ``peer`` (the thread that asked as ``rid``) the one that computes ``key``."""
        lease = Lease(key, peer, rid, self._token(key), holding)
        self._leases[key] = lease
        return lease

    def adopt(self, key: str, holder: Any, token: int) -> Lease:
        """Take over a lease granted by a former loader (same store), with its token."""
        lease = Lease(key, holder, 0, token, ())
        self._leases[key] = lease
        return lease

    def _mine(self, peer: Any, holding: tuple[str, ...]) -> list[str]:
        return [key for key in holding if (lease := self._leases.get(key)) and lease.holder is peer]

    def cycle(self, key: str, peer: Any, holding: tuple[str, ...]) -> list[str] | None:
        """The keys of the cycle that ``peer``'s thread (computing ``holding``) would close
        by waiting for ``key``, first key repeated last; None if waiting is safe."""
        mine = self._mine(peer, holding)
        if key in mine:
            return [key, key]
        chain, current = [key], key
        while current in self._blocked:
            current = self._blocked[current]
            if current in chain:  # a cycle without us: not ours to report
                return None
            chain.append(current)
            if current in mine:
                return [current, *chain]
        return None

    def wait(self, lease: Lease, peer: Any, rid: int, holding: tuple[str, ...]) -> None:
        """Queue ``peer``'s request ``rid`` for ``lease``'s value."""
        lease.waiters.append(Waiter(peer, rid, holding))
        for key in self._mine(peer, holding):
            self._blocked[key] = lease.key

    def _unblock(self, waiter: Waiter, key: str) -> None:
        for held in waiter.holding:
            if self._blocked.get(held) == key:
                del self._blocked[held]

    def settle(self, key: str) -> list[Waiter]:
        """End the lease on ``key`` (its value is stored); the waiters to answer."""
        lease = self._leases.pop(key, None)
        if lease is None:
            return []
        for waiter in lease.waiters:
            self._unblock(waiter, key)
        self._blocked.pop(key, None)
        return list(lease.waiters)

    def pass_on(self, lease: Lease, alive: Callable[[Any], bool]) -> Lease | None:
        """Give ``lease`` to its first waiter still connected; None when nobody waits."""
        self._blocked.pop(lease.key, None)
        while lease.waiters:
            waiter = lease.waiters.popleft()
            self._unblock(waiter, lease.key)
            if alive(waiter.peer):
                lease.holder, lease.rid, lease.holding = waiter.peer, waiter.rid, waiter.holding
                lease.token, lease.since = self._token(lease.key), time.monotonic()
                lease.committing = False
                return lease
        del self._leases[lease.key]
        return None

    def withdraw(self, lease: Lease, peer: Any, rid: int) -> None:
        """Drop the queued request ``rid`` of ``peer`` (its caller stopped waiting)."""
        for waiter in list(lease.waiters):
            if waiter.peer is peer and waiter.rid == rid:
                lease.waiters.remove(waiter)
                self._unblock(waiter, lease.key)

    def forget_waits_of(self, peer: Any) -> list[Lease]:
        """Drop ``peer``'s queued requests; the leases it holds (to pass on)."""
        held = []
        for lease in list(self._leases.values()):
            kept: collections.deque[Waiter] = collections.deque()
            for waiter in lease.waiters:
                if waiter.peer is peer:
                    self._unblock(waiter, lease.key)
                else:
                    kept.append(waiter)
            lease.waiters = kept
            if lease.holder is peer:
                held.append(lease)
        return held

    def describe(self) -> list[dict[str, Any]]:
        """Each lease for a status report: key, holder, seconds held, waiters."""
        now = time.monotonic()
        return [
            {
                "key": lease.key,
                "holder": lease.holder.name,
                "held_for": round(now - lease.since, 3),
                "waiters": [waiter.peer.name for waiter in lease.waiters],
            }
            for lease in sorted(self._leases.values(), key=lambda lease: lease.key)
        ]


def base_version(token: int) -> int | None:
    """The version its key had when the lease numbered ``token`` was given: a key whose
    version is higher now changed since (a put, or a delete). None: the token does not say
    (0, or one of an earlier release)."""
    return token >> _BASE_SHIFT if token & _HAS_BASE else None
