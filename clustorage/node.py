"""The public, synchronous Node: a hit reads the local replica only (SPEC "Python API")."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, NamedTuple, Self

from . import codec, interrupts
from .channel import Channel, CutOff
from .compiler import check_function_name
from .config import Cookie, LoaderAddress, NodeConfig
from .errors import ClustorageError, DeadlockError, Interrupted, LoaderUnavailable, NotFound
from .keys import Key, normalize_key
from .messages import (
    FUNCTION,
    VALUE,
    Await,
    Commit,
    Committed,
    Define,
    Defined,
    Delete,
    Deleted,
    Entry,
    Fetch,
    Found,
    History,
    HistoryReply,
    LeaseGranted,
    Message,
    Payload,
    Put,
    Release,
    Status,
    StatusReply,
)
from .replica import MISSING, LoadEvent, Replica

__all__ = ["Definition", "Node"]

log = logging.getLogger(__name__)

ASK_AGAIN = 3  # times a get cut off from the loader asks again once reconnected

Source = str | Callable[[], str]


class Definition(NamedTuple):
    """What ``define`` reports: the version, and which nodes have installed it."""

    name: str
    version: int
    changed: bool
    installed: tuple[str, ...]
    missing: tuple[str, ...]


class Node:
    """One node of a cluster: the loader if no loader is named, else a member.

    Args:
        name: this node's name (``$CLUSTORAGE_NAME``, else generated).
        loader: ``NAME[@HOST[:PORT]]`` of the loader (``$CLUSTORAGE_LOADER``); none means this
            node is the loader. ``NAME@HOST:PORT,HOST:PORT`` lists a loader and its standbys
            (SPEC "High availability"): the member follows the active one.
        cookie, cookie_file: the cluster secret (else ``$CLUSTORAGE_COOKIE``, else
            ``~/.clustorage/cookie``).
        listen: ``HOST:PORT`` a loader listens on (default ``127.0.0.1:4370``).
        data: a loader's data directory, or ``:memory:``.
        store: a loader's PostgreSQL store, ``postgresql://...`` (``$CLUSTORAGE_STORE``):
            several loaders of one name may share it, one active and the others standing by.
        timeout: seconds to wait for the loader before raising LoaderUnavailable.
        dead_after: seconds after which a peer host that stopped answering is taken for
            dead (``$CLUSTORAGE_DEAD_AFTER``, default 15); a busy process never is.
        eager_limit: a loader's: values of more bytes are announced to every node and sent
            only to those that get them (``$CLUSTORAGE_EAGER_LIMIT``, default 1 MiB).
        tls_cert, tls_key, tls_ca: PEM files for TLS (``$CLUSTORAGE_TLS_CERT``, ``_KEY``,
            ``_CA``): all three or none; ``clustorage tls init`` makes them.

    Raises:
        ConfigError, AuthenticationError, NameClashError, StoreError: the node cannot start.
    """

    def __init__(
        self,
        name: str | None = None,
        loader: str | LoaderAddress | None = None,
        *,
        cookie: str | bytes | Cookie | None = None,
        cookie_file: str | os.PathLike[str] | None = None,
        listen: str | tuple[str, int] | None = None,
        data: str | os.PathLike[str] | None = None,
        timeout: float | None = None,
        max_frame: int | None = None,
        dead_after: float | None = None,
        eager_limit: int | None = None,
        store: str | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
    ) -> None:
        self.config = NodeConfig.resolve(
            name=name,
            loader=loader,
            cookie=cookie,
            cookie_file=cookie_file,
            listen=listen,
            data=data,
            timeout=timeout,
            max_frame=max_frame,
            dead_after=dead_after,
            eager_limit=eager_limit,
            store=store,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_ca=tls_ca,
        )
        self.name = self.config.name
        self.timeout = self.config.timeout
        self._replica = Replica()
        self._values = self._replica.values
        self._functions = self._replica.functions
        self._change_listeners: list[Callable[[], None]] = []
        self._thread_state = threading.local()
        self._asking: dict[int, str] = {}  # request number -> key, for waiting()
        # Big values being fetched, by key: another thread's get of one waits for that fetch
        # instead of fetching the bytes again.
        self._fetching: dict[str, threading.Event] = {}
        self._fetching_lock = threading.Lock()
        # The leases whose fn runs here, key -> token: a new connection reclaims them.
        self._leases_held: dict[str, int] = {}
        self._stopped = False
        self._channel: Channel
        if self.config.loader is None:
            from .runtime import LoaderRuntime

            runtime = LoaderRuntime(self.config, self._replica, self._changed)
            self._channel = runtime
            self.address: tuple[str, int] = runtime.address
        else:
            from .member import MemberClient

            client = MemberClient(self.config, self._replica, self._changed, self._leases_held)
            self._channel = client
            self.address = (self.config.loader.host, self.config.loader.port)
            client.start()
        self.started = time.time()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<clustorage.Node {self.name} ({self.role} of {self.loader_address}, {state})>"

    # -- identity --------------------------------------------------------------------------

    @property
    def is_loader(self) -> bool:
        return self.config.loader is None

    @property
    def role(self) -> str:
        return "loader" if self.is_loader else "member"

    @property
    def loader_address(self) -> str:
        """``NAME@HOST:PORT`` of this cluster's loader."""
        if self.config.loader is not None:
            return str(self.config.loader)
        return str(LoaderAddress(self.name, *self.address))

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopped

    @property
    def connected(self) -> bool:
        return self._channel.connected and not self._stopped

    # -- values ----------------------------------------------------------------------------

    def get(self, key: Key, fn: Callable[[], Any] | None = None) -> Any:
        """The value of ``key``, computed by ``fn()`` once for the whole cluster on a miss.

        Raises:
            NotFound: the cluster has no ``key`` and no ``fn`` was given.
            TypeError: the value cannot be serialized (the message names the key).
            LoaderUnavailable: a miss while the loader cannot be reached.
            DeadlockError: ``fn`` needs ``key`` itself, or a key whose computation waits
                (through other keys, on any node) for one this thread is computing.
            LeaseLost: this node was cut off while ``fn`` ran, and the key's lease passed
                on; the value was not stored.
        """
        try:
            return self._values[key]  # type: ignore[index]
        except (KeyError, TypeError):
            pass
        __tracebackhide__ = True
        return self._get_slow(key, fn)

    def _get_slow(self, key: Key, fn: Callable[[], Any] | None) -> Any:
        __tracebackhide__ = True
        key = normalize_key(key)
        values = self._values
        ours: threading.Event | None = None  # set: this thread fetches for the others
        try:
            while True:
                if key in values:
                    return values[key]
                if (recorded := self._replica.read_unread(key)) is not MISSING:
                    return recorded
                if not self._replica.announced(key):
                    return self._get_missing(key, fn)
                with self._fetching_lock:
                    fetching = self._fetching.get(key)
                    if fetching is None:
                        ours = fetching = threading.Event()
                        self._fetching[key] = ours
                        break
                fetching.wait()  # bounded by that get's own timeout
            # The bytes of a version this node heard of; others wait for them, not for a fn.
            try:
                reply, epoch = self._fetch(key, False, ())
            except KeyboardInterrupt:
                raise Interrupted(f"stopped waiting for {key!r}") from None
            if type(reply) is Found:
                return self._install(reply.entry, epoch=epoch)
        finally:
            if ours is not None:
                with self._fetching_lock:
                    del self._fetching[key]
                ours.set()
        return self._get_missing(key, fn)  # deleted meanwhile

    def _get_missing(self, key: str, fn: Callable[[], Any] | None) -> Any:
        """``get`` of a key this node holds no value of: asked of the loader."""
        __tracebackhide__ = True
        computing = self._computing()
        if key in computing:
            chain = " -> ".join(repr(held) for held in [*computing[computing.index(key) :], key])
            raise DeadlockError(
                f"the fn computing {key!r} needs {key!r} itself ({chain}); compute it another way"
            )
        try:
            reply, epoch = self._fetch(key, fn is not None, tuple(computing))
        except KeyboardInterrupt:
            raise Interrupted(f"stopped waiting for {key!r}") from None
        if type(reply) is Found:
            return self._install(reply.entry, epoch=epoch)
        if fn is None or type(reply) is not LeaseGranted:
            raise NotFound(
                f"the cluster has no value for {key!r}; pass a function that computes it, "
                f"as in get({key!r}, lambda: ...)"
            )
        token = reply.token
        self._leases_held[key] = token
        try:
            value, payload = self._compute(key, fn, token)  # a fn that raises: released
            # A value computed is not given up lightly: its commit waits for a loader that
            # is down (restarting, say) for as long as a leaseholder is waited for.
            patience = self.timeout + self.config.dead_after
            try:
                commit = self._write(lambda rid: Commit(rid, key, token, payload), value, patience)
            except BaseException as exc:
                if isinstance(exc, LoaderUnavailable) or not isinstance(exc, ClustorageError):
                    # Not answered (a refusal passed the lease on already): maybe still ours.
                    self._end_lease(key, token, f"its commit got no answer ({type(exc).__name__})")
                raise
            return commit[0]
        finally:
            self._end_lease(key, token)

    def _end_lease(self, key: str, token: int, release: str = "") -> None:
        """This node no longer computes ``key`` under ``token``; ``release``: tell the
        loader why, so that the lease passes on (a commit it took settles it anyway).
        Not if another thread of this node holds the key's lease now: a Release names no
        token, and this one's lease ended at the loader already."""
        if self._leases_held.get(key) != token:
            return
        del self._leases_held[key]
        if release:
            self._channel.notify(lambda rid: Release(rid, key, release))

    def _write(
        self, build: Callable[[int], Message], value: Any, timeout: float | None = None
    ) -> tuple[Any, int]:
        """Put or commit ``value``: the object installed and its version. A Ctrl-C once it
        is answered is raised after the install, since the fan-out skips the writer."""
        interrupts.hold()
        try:
            reply, epoch = self._ask(build, timeout=timeout)
            assert type(reply) is Committed
            return self._install(reply.entry, value, epoch=epoch), reply.entry.version
        finally:
            interrupts.release()

    def _computing(self) -> list[str]:
        """The keys whose fn this thread is running, outermost first."""
        stack: list[str] | None = getattr(self._thread_state, "computing", None)
        if stack is None:
            stack = self._thread_state.computing = []
        return stack

    def _ask(
        self, build: Callable[[int], Message], patient: bool = False, timeout: float | None = None
    ) -> tuple[Message, int]:
        """Send a request; its answer, and the replica's epoch when it was sent."""
        epoch = self._replica.epoch

        def built(rid: int) -> Message:
            nonlocal epoch
            epoch = self._replica.epoch
            return build(rid)

        reply = self._channel.request(built, timeout or self.timeout, patient)
        return reply, epoch

    def _fetch(self, key: str, lease: bool, holding: tuple[str, ...]) -> tuple[Message, int]:
        """Ask the loader for ``key`` (for its lease, if ``lease``); a request this thread
        stops waiting for is withdrawn, so that its lease cannot end up with nobody.

        Cut off from the loader before its answer came, it asks again once connected
        (within the node's timeout), saying whose lease it waited for, if it was queued."""
        asked = 0
        behind = ""

        def fetch(rid: int) -> Fetch | Await:
            nonlocal asked
            self._asking.pop(asked, None)  # numbered anew: it was not sent
            asked = rid
            self._asking[rid] = key
            if behind:
                return Await(rid, key, holding, behind)
            return Fetch(rid, VALUE, key, lease, holding)

        cuts = 0
        try:
            while True:
                try:
                    return self._ask(fetch)
                except CutOff as cut:
                    cuts += 1
                    if cuts > ASK_AGAIN:  # a loader that keeps dropping us: give up
                        raise
                    log.info(
                        "%s: lost the loader while asking for %r%s; asking again once connected",
                        self.name,
                        key,
                        f" (computed by {cut.holder})" if cut.holder else "",
                    )
                    self._asking.pop(asked, None)
                    asked, behind = 0, cut.holder or behind  # cut again in flight
        except BaseException:
            if lease and asked:
                self._channel.notify(lambda _: Release(asked, key, "the caller stopped waiting"))
            raise
        finally:
            self._asking.pop(asked, None)

    def waiting(self) -> list[tuple[str, str, float]]:
        """What this node's callers wait for: ``(key, holder, since)`` for each ``get``
        queued on a key another node (or thread) computes; ``since`` is when the holder
        started (``time.time()`` seconds)."""
        asking = dict(self._asking)
        return [
            (asking[rid], holder, since)
            for rid, (holder, since) in self._channel.pending.queued.copy().items()
            if rid in asking
        ]

    def _compute(self, key: str, fn: Callable[[], Any], token: int) -> tuple[Any, Payload]:
        __tracebackhide__ = True
        computing = self._computing()
        computing.append(key)
        try:
            value = fn()
            payload = codec.dump_borrowing(key, value)
            codec.check_size(key, payload, self.config.max_frame)
        except BaseException as exc:
            self._end_lease(key, token, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            computing.pop()
        return value, payload

    def _install(self, entry: Entry, obj: Any = MISSING, *, epoch: int | None = None) -> Any:
        """Install an answer's entry (unless something newer is here); the answer's object."""
        self._replica.install(entry, obj, epoch=epoch)
        if obj is not MISSING:
            return obj
        table = self._functions if entry.kind == FUNCTION else self._values
        held = table.get(entry.key, MISSING)
        if held is not MISSING and self._replica.version(entry.kind, entry.key) == entry.version:
            return held
        return codec.load(entry.payload)  # superseded or deleted meanwhile: the answer stands

    def put(self, key: Key, value: Any) -> int:
        """Store ``value`` under ``key`` as a new version everywhere; returns the version."""
        key = normalize_key(key)
        payload = codec.dump_borrowing(key, value)
        codec.check_size(key, payload, self.config.max_frame)
        return self._write(lambda rid: Put(rid, key, payload), value)[1]

    def delete(self, key: Key, kind: str = VALUE) -> bool:
        """Delete a value (or, with ``kind="function"``, a function) everywhere."""
        key = normalize_key(key) if kind == VALUE else check_function_name(str(key))
        reply, epoch = self._ask(lambda rid: Delete(rid, kind, key))
        assert type(reply) is Deleted
        self._replica.remove(kind, key, reply.version, self.name, epoch=epoch)
        return reply.existed

    def keys(self) -> list[str]:
        """Every value key, sorted."""
        return self._replica.keys()

    # -- functions -------------------------------------------------------------------------

    def call(self, name: str, args: Iterable[Any] = (), fn: Source | None = None) -> Any:
        """Call function ``name`` with ``*args``, defining it from ``fn``'s source if needed.

        Raises:
            NotFound: the cluster has no function ``name`` and no source was given.
            CompileError: the source did not compile on the loader.
        """
        __tracebackhide__ = True
        function = self._functions.get(name)
        if function is None:
            function = self._load_function(name, fn)
        return function(*args)

    def _load_function(self, name: str, fn: Source | None) -> Callable[..., Any]:
        check_function_name(name)
        reply, epoch = self._ask(lambda rid: Fetch(rid, FUNCTION, name, False))
        if type(reply) is Found:
            return self._install(reply.entry, epoch=epoch)  # type: ignore[no-any-return]
        if fn is None:
            raise NotFound(
                f"the cluster has no function {name!r}; give its source, as in "
                f"call({name!r}, [...], 'def {name}(...): ...')"
            )
        self.define(name, fn() if callable(fn) else fn, force=False)
        return self._functions[name]

    def define(self, name: str, source: Source, force: bool = True) -> Definition:
        """Compile ``source`` as function ``name`` on the loader and hot-load it everywhere.

        Makes a new version (SPEC: define forces one); with ``force=False`` unchanged source
        makes none. Returns once every node connected at that moment has installed it, was
        dropped, or the timeout passed.

        Raises:
            CompileError: the loader's message, with ``<cluster:NAME>``, line and column.
        """
        check_function_name(name)
        text = source() if callable(source) else source
        if not isinstance(text, str):
            raise TypeError(f"the source of {name!r} must be a str, not {type(text).__name__}")
        # Patient: compiling runs the user's module-level code, which may take a while.
        try:
            reply, epoch = self._ask(lambda rid: Define(rid, name, text, force), patient=True)
        except KeyboardInterrupt:
            raise Interrupted(f"stopped waiting for the definition of {name!r}") from None
        assert type(reply) is Defined
        self._install(reply.entry, epoch=epoch)
        entry = reply.entry
        return Definition(name, entry.version, reply.changed, reply.installed, reply.missing)

    def functions(self) -> list[str]:
        """Every function name, sorted."""
        return self._replica.function_names()

    def function(self, name: str) -> Callable[..., Any]:
        """The loaded function ``name``."""
        try:
            return self._functions[name]
        except KeyError:
            raise NotFound(f"no function {name!r} is loaded on {self.name}") from None

    def source(self, name: str) -> str:
        """The source text of function ``name``."""
        try:
            return self._replica.sources[name]
        except KeyError:
            raise NotFound(f"no function {name!r} is loaded on {self.name}") from None

    def version(self, key: str, kind: str = FUNCTION) -> int:
        """The version of ``key`` held here (0 when absent)."""
        return self._replica.version(kind, key)

    def history(self, key: Key, kind: str = FUNCTION) -> list[Entry]:
        """Every stored version of a function (or value), oldest first, from the loader."""
        text = normalize_key(key)
        reply = self._channel.request(lambda rid: History(rid, kind, text), self.timeout)
        assert type(reply) is HistoryReply
        return list(reply.entries)

    # -- cluster ---------------------------------------------------------------------------

    def nodes(self) -> list[str]:
        """Names of the connected nodes, the loader first."""
        return list(self._channel.members)

    def status(self) -> dict[str, Any]:
        """This node and, when the loader answers, the cluster's state."""
        status: dict[str, Any] = {
            "name": self.name,
            "role": self.role,
            "loader": self.loader_address,
            "connected": self.connected,
            "keys": len(self._replica.keys()),
            "functions": len(self._functions),
            "nodes": [],
        }
        if not self.connected and (error := self._channel.last_error):
            status["loader_error"] = error  # why the loader could not be reached
        if self.connected:
            reply = self._channel.request(Status, self.timeout)
            assert type(reply) is StatusReply
            status["cluster"] = reply.status
            status["nodes"] = reply.status["nodes"]
        return status

    def on_load(self, callback: Callable[[LoadEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` on every install or removal; returns an unsubscribe function.

        Callbacks run on a background thread and must not block on the cluster.
        """
        return self._replica.on_load(callback)

    def on_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` when nodes join or leave, or the connection to the loader drops
        or comes back: for keeping a status display current (the shell's toolbar uses it).
        It runs on a background thread and must return quickly; returns an unsubscribe
        function."""
        self._change_listeners.append(callback)
        return lambda: self._change_listeners.remove(callback)

    def _changed(self) -> None:
        for callback in list(self._change_listeners):
            try:
                callback()
            except Exception:
                log.exception("an on_change listener failed")

    # -- lifetime --------------------------------------------------------------------------

    def stop(self) -> None:
        """Leave the cluster (a loader stops serving). Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self._channel.close()
        self._changed()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
