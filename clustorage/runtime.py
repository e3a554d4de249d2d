"""The loader node's machinery: its event-loop thread, its server, and its in-process channel."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from . import interrupts, tls
from .aioloop import new_loop
from .bulk import RECYCLED, SPILLED
from .channel import Build, Pending, acknowledgement, apply_push, record_late_write
from .config import NodeConfig
from .errors import ConfigError, LoaderUnavailable
from .hello import Timing
from .lease_file import WRITE_AFTER, LeaseFile
from .listener import Listener, Newcomer
from .loader import LoaderCore
from .messages import VALUE, Commit, Gathered, Load, Message, Payload, Put, joined
from .replica import Replica
from .server import ServerConnection
from .stay_awake import StayAwake
from .store import MEMORY, Store, open_store
from .writer import StoreWriter

if TYPE_CHECKING:  # psycopg is imported only by loaders with a PostgreSQL store
    from .pgstore import PostgresStore
    from .standby import Campaign, StandbyCore

__all__ = ["LoaderRuntime"]

log = logging.getLogger(__name__)


def _read_only(message: Message) -> Message:
    """``message`` with its entry's payload read-only: the loader's own node gets the very
    payload the loader keeps and sends on, and an array decoded from it (out of band, a view
    of it) must not be able to change that under its digest."""
    entry = getattr(message, "entry", None)
    if entry is None or isinstance(entry.payload, bytes):
        return message
    view = memoryview(entry.payload)
    if view.readonly:
        return message
    replace: Any = message._replace
    return cast(Message, replace(entry=entry._replace(payload=view.toreadonly())))


class _LocalPeer:
    """The loader's own node, as a peer of its core: deliveries go straight to the replica."""

    def __init__(self, runtime: LoaderRuntime, name: str) -> None:
        self.name = name
        self.address = "local"
        self.connected_since = time.time()
        self._runtime = runtime

    def deliver(self, message: Message, parts: tuple[bytes, Payload] | None = None) -> None:
        runtime = self._runtime
        message = _read_only(message)
        rid = getattr(message, "rid", None)
        if rid is not None:
            if not runtime.pending.resolve(rid, message):  # its caller stopped waiting
                record_late_write(runtime.replica, message)
            return
        if type(message) is Load and message.entry.kind == VALUE:
            # Recorded, not deserialized: a headless loader never unpickles what it only
            # stores, and the loop that sends big values on is not held up by it.
            runtime.replica.install(message.entry, lazy=True)
        elif apply_push(runtime.replica, message):
            runtime.members = runtime.core.member_names()
            runtime.changed()
        if type(message) is Load and message.ack:
            loaded = acknowledgement(runtime.replica, message.entry)
            runtime.loop.call_soon(runtime.core.handle, self, loaded)


class LoaderRuntime:
    """A loader: its store, its core and its TCP server, on a background event-loop thread.

    Also the loader node's :class:`~clustorage.channel.Channel`: its own requests go to the
    core through the loop, without the network.
    """

    def __init__(self, config: NodeConfig, replica: Replica, changed: Callable[[], None]) -> None:
        self.config = config
        self.replica = replica
        self.changed = changed
        self.pending = Pending()
        self.timing = Timing(dead_after=config.dead_after)
        self.members: tuple[str, ...] = (config.name,)
        self._connections: set[ServerConnection] = set()
        files = tls.node_files(config)
        self._context = None if files is None else tls.server_context(files)  # or ConfigError
        self.loop = new_loop()
        self._awake = StayAwake(self.loop)
        self._thread = threading.Thread(
            target=self._run, name=f"clustorage-loader-{config.name}", daemon=True
        )
        # Listen before the store is opened, so a loader that cannot listen creates no file.
        # The loop does not run yet: nothing is accepted before the core exists.
        self._server = self._listen()
        try:
            store = self._open_store()
        except BaseException:
            self._server.close()
            self.loop.close()
            raise
        self._writer = (
            StoreWriter(store, self._post, inline=not config.store, soon=self.loop.call_soon)
            if store.path != MEMORY
            else None
        )
        self._compilers = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix=f"clustorage-compile-{config.name}"
        )
        self._store = store
        # A restarted loader finds the leases it granted (with standbys: in PostgreSQL).
        self._lease_file = (
            LeaseFile.open(
                Path(f"{store.path}.leases"),
                functools.partial(self.loop.call_later, WRITE_AFTER),
            )
            if store.path != MEMORY and not config.store
            else None
        )
        self._campaign: Campaign | None = None
        self._standby: StandbyCore | None = None
        if config.store:  # with standbys, a loader is one until it takes the lock (_promote)
            from .standby import StandbyCore

            self._standby = StandbyCore(config.name, store.identity, "", store.path)
        self.core: LoaderCore = self._standby or self._new_core()
        self._heartbeat: Any = None
        self._local = _LocalPeer(self, config.name)
        self._thread.start()
        try:
            self.address: tuple[str, int] = self.submit(self._start, config.timeout)
        except BaseException:
            self.close()
            raise

    def _open_store(self) -> Store:
        if not self.config.store:
            return open_store(self.config.database)
        from .pgstore import PostgresStore

        return PostgresStore(self.config.store, self.config.name, self.config.dead_after)

    def _new_core(self) -> LoaderCore:
        return LoaderCore(
            self.config.name,
            self._store,
            self.loop.call_later,
            ack_timeout=self.config.timeout,
            max_frame=self.config.max_frame,
            writes=self._writer,
            aside=self._aside,
            eager_limit=self.config.eager_limit,
            soon=self.loop.call_soon,
            book=self._store if self._standby is not None else self._lease_file,  # type: ignore[arg-type]
            lease_grace=self.config.dead_after + self.config.timeout,
        )

    @property
    def connected(self) -> bool:
        return self.core is not self._standby

    @property
    def last_error(self) -> str:
        return "" if self.connected else "this loader stands by"

    def _campaign_for(self, store: PostgresStore, standby: StandbyCore) -> Campaign:
        """Stand by until this loader takes the lock of its PostgreSQL store."""
        from .leadership import Leadership
        from .standby import Campaign

        leadership = Leadership(self.config.store, self.config.name, self.config.dead_after)
        return Campaign(
            leadership,
            store,
            standby,
            lambda epoch: self._post(self._promote, epoch),
            lambda: self._post(self._step_down),
        )

    def _promote(self, epoch: int) -> None:
        """On the loop: take over, with everything the store holds now."""
        standby = self._standby
        if standby is None or self.core is not standby:
            return
        for connection in list(self._connections):
            connection.close()  # probes of the standby; members were refused already
        try:
            core = self._new_core()
        except Exception:
            log.exception("loader %s could not read its store to take over", self.config.name)
            if self._campaign is not None:
                self._campaign.lose()
            return
        core.address = standby.address
        self.core = core
        self._serve_local()
        log.info(
            "loader %s active on %s (epoch %d) with %d entries",
            self.config.name,
            core.address,
            epoch,
            len(core.entries),
        )
        self.changed()

    def _serve_local(self) -> None:
        """The loader's own node: what the core holds, loaded when first asked for, and a
        member of its cluster."""
        for entry in self.core.entries.values():
            self.replica.install(entry, lazy=True)
        self.core.join(self._local)

    def _step_down(self) -> None:
        """On the loop: this loader lost its lock; it serves nobody until it takes it again."""
        standby = self._standby
        if standby is None or self.core is standby:
            return
        for connection in list(self._connections):
            connection.close()
        self.core.leave(self._local)
        self.core = standby
        self.pending.fail_all(LoaderUnavailable(standby.refusal()))
        self.changed()

    def _aside(
        self, work: Callable[[], Any], done: Callable[[Any, BaseException | None], None]
    ) -> None:
        """Run ``work`` on a compiling thread; ``done(result, error)`` on the loop."""

        def finished(future: concurrent.futures.Future[Any]) -> None:
            error = future.exception()
            result = None if error is not None else future.result()
            self._post(done, result, error)

        self._compilers.submit(work).add_done_callback(finished)

    def _post(self, callback: Callable[..., object], *args: Any) -> None:
        """Call ``callback(*args)`` on the loop, from any thread; not once the loop is closed
        (the loader has stopped: what was done is of no use any more)."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(callback, *args)

    def _run(self) -> None:
        self.loop.run_forever()

    def _listen(self) -> Listener:
        host, port = self.config.listen
        cookie = self.config.cookie.secret

        def connection(newcomer: Newcomer) -> ServerConnection:
            return ServerConnection(
                self.core,
                cookie,
                self.timing,
                self.config.max_frame,
                self._connections,
                newcomer,
                self._awake,
            )

        try:
            return Listener(
                self.loop,
                host,
                port,
                connection,
                handshake=self.timing.handshake,
                context=self._context,
            )
        except OSError as exc:
            self.loop.close()
            raise ConfigError(
                f"the loader {self.config.name} cannot listen on {host}:{port}: {exc.strerror}; "
                f"is another loader running there? choose another address with --listen HOST:PORT"
            ) from exc

    def _start(self) -> tuple[str, int]:
        address = self._server.socket.getsockname()
        self.core.address = f"{address[0]}:{address[1]}"
        self._store.announce(self.core.address)  # who holds the store, for a second loader
        self._local.address = self.core.address
        if self._standby is not None:
            from .pgstore import PostgresStore

            assert isinstance(self._store, PostgresStore)
            self._standby.address = self.core.address
            self._campaign = self._campaign_for(self._store, self._standby)
            self._campaign.start()
            log.info("loader %s listening on %s", self.config.name, self.core.address)
            return address[0], address[1]
        self._serve_local()
        self._heartbeat = self.loop.call_later(self.timing.heartbeat / 2, self._heartbeats)
        log.info(
            "loader %s listening on %s with %d entries from %s",
            self.config.name,
            self.core.address,
            len(self.core.entries),
            self._store.path,
        )
        return address[0], address[1]

    def _heartbeats(self) -> None:
        self._heartbeat = self.loop.call_later(self.timing.heartbeat / 2, self._heartbeats)
        now = time.monotonic()
        RECYCLED.sweep(now)
        SPILLED.sweep()
        for connection in list(self._connections):
            connection.tick(now)

    def submit(self, function: Callable[[], Any], timeout: float) -> Any:
        """Run ``function()`` on the loop and wait for its result (never from the loop)."""
        self._check_thread()
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(function())
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout)

    def _check_thread(self) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError(
                "a blocking clustorage call was made on the loader's own event-loop thread "
                "(from an on_load listener?); hand the work to another thread"
            )

    def request(self, build: Build, timeout: float, patient: bool = False) -> Message:
        self._check_thread()
        if self.loop.is_closed():
            raise LoaderUnavailable(f"the loader {self.config.name} has stopped")
        rid, waiter = self.pending.open(patient)
        message = build(rid)
        if isinstance(message, Put | Commit) and isinstance(message.payload, Gathered):
            # Handed to the loop, not sent: it gets its own copy before the caller goes on.
            message = message._replace(payload=joined(message.payload))
        self.loop.call_soon_threadsafe(self.core.handle, self._local, message)
        try:
            return self.pending.wait(
                rid, waiter, timeout, self.loop.is_running, safe_point=interrupts.check
            )
        except BaseException:  # Ctrl-C, or no answer in time
            if not self.pending.discard(rid) and waiter.done and waiter.reply is not None:
                record_late_write(self.replica, waiter.reply)  # it came meanwhile
            raise

    def notify(self, build: Build) -> None:
        self._post(self.core.handle, self._local, build(0))

    def _shutdown(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self._server.close()
        for connection in list(self._connections):
            # The loader stops, not its members: their leases are kept (the lease file) for
            # the loader that comes next, not passed on as each connection closes.
            self.core.detach(connection)
            connection.close()
        self.core.leave(self._local)

    def close(self) -> None:
        """Stop serving, close every connection and the store."""
        if self.loop.is_closed():
            return
        if self._campaign is not None:
            self._campaign.stop()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            try:
                self.submit(self._shutdown, 5)
            except Exception:
                log.exception("loader %s: unclean shutdown", self.config.name)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()
        self._compilers.shutdown(wait=False, cancel_futures=True)
        if self._writer is not None:
            self._writer.close()
        if self._lease_file is not None:  # before the store's lock goes
            self._lease_file.close()
        self._store.close()
        self.pending.fail_all(LoaderUnavailable(f"the loader {self.config.name} has stopped"))
