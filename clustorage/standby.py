"""A loader that stands by: it answers members with the active loader's address, and
probes with its role, until it takes the PostgreSQL lock (SPEC "High availability")."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .errors import LoaderUnavailable, StoreError
from .leadership import Leadership
from .loader import LoaderCore, Peer, failure
from .messages import Message, Status, StatusReply
from .pgstore import PostgresStore
from .store import MemoryStore

__all__ = ["POLL", "Campaign", "StandbyCore"]

log = logging.getLogger(__name__)

POLL = 0.5  # seconds between a standby's tries for the lock, and the active's checks of it


class StandbyCore(LoaderCore):
    """The core of a loader that is not active: it holds nothing and serves nothing; the
    server refuses members with :attr:`standby_of`, the active loader's address."""

    def __init__(self, name: str, identity: str, address: str, store: str) -> None:
        super().__init__(name, MemoryStore(), lambda delay, call: _NoTimer(), address=address)
        self.store_identity = identity
        self.standby_of = ""
        self._store_path = store

    def handle(self, peer: Peer, message: Message) -> None:
        if type(message) is Status:
            peer.deliver(StatusReply(message.rid, self.status()))
            return
        rid = getattr(message, "rid", 0)
        if rid:
            peer.deliver(failure(rid, LoaderUnavailable(self.refusal())))

    def refusal(self) -> str:
        """What a member hears: where the active loader is."""
        return f"standby; the active loader is {self.standby_of or 'not known yet'}"

    def status(self) -> dict[str, Any]:
        return {
            "loader": self.name,
            "role": "standby",
            "active": self.standby_of,
            "address": self.address,
            "store": self._store_path,
            "started": self.started,
            "nodes": [],
            "keys": 0,
            "functions": 0,
            "leases": [],
            "computing": [],
        }


class _NoTimer:
    def cancel(self) -> None:
        pass


class Campaign:
    """The thread that takes the lock when it is free (``promote(epoch)``) and, once
    active, checks it every POLL seconds, stepping down (``step_down()``) when it is lost.

    Both callbacks run on this thread; the store's epoch is set before ``promote`` and
    fenced (no write passes) before ``step_down``.
    """

    def __init__(
        self,
        leadership: Leadership,
        store: PostgresStore,
        standby: StandbyCore,
        promote: Callable[[int], None],
        step_down: Callable[[], None],
    ) -> None:
        self._leadership = leadership
        self._store = store
        self._standby = standby
        self._promote = promote
        self._step_down = step_down
        self._stopping = threading.Event()
        self.active = False
        self._thread = threading.Thread(
            target=self._run, name=f"clustorage-campaign-{leadership.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        failing = ""  # the last failure logged: a standby that cannot reach the database
        while not self._stopping.is_set():  # says so once, not twice a second
            try:
                self._once()
                failing = ""
            except StoreError as exc:
                why = str(exc).partition(":")[0]
                log.log(
                    logging.WARNING if why != failing else logging.DEBUG,
                    "loader %s: %s",
                    self._leadership.name,
                    exc,
                )
                failing = why
                if self.active:
                    self.lose()
            self._stopping.wait(POLL)

    def _once(self) -> None:
        if self.active:
            if not self._leadership.holding():
                self.lose()
            return
        epoch = self._leadership.acquire(self._standby.address)
        if epoch is None:
            active = self._leadership.active()
            if active != self._standby.standby_of:
                log.info("loader %s stands by; the active one is %s", self._standby.name, active)
            self._standby.standby_of = active
            return
        self._store.epoch = epoch
        self.active = True
        log.info("loader %s is active (epoch %d)", self._standby.name, epoch)
        self._promote(epoch)

    def lose(self) -> None:
        self._store.epoch = -1  # no write passes from now on: another loader may take over
        self.active = False
        self._leadership.drop()
        log.warning("loader %s lost its lock and stands by", self._standby.name)
        self._step_down()

    def stop(self) -> None:
        self._stopping.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(5)
        self._leadership.drop()
