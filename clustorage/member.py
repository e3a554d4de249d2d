"""A member's connection to the loader: blocking sockets, callers reading, reconnection.

Callers send their own requests (under a lock, so frames leave in sequence order). Whoever
holds the io lock reads the socket: usually the caller itself, waiting for its own answer,
which saves a thread switch per request; a background thread reads while nobody else is
waiting. The reader wakes callers with their answers (by request number), applies pushes to
the replica and acknowledges hot-loads. When the connection drops, waiting callers get
LoaderUnavailable and the background thread reconnects with capped exponential backoff, then
resynchronises by versions before anyone's request goes out again. A new connection first
reclaims the leases whose fn runs here, and a caller that was queued behind another node's
lease is told so (CutOff), to ask again rather than give up: across a loader's restart, the
value is still computed once.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable

from . import codec, interrupts, messages, tls
from .channel import (
    SLICE,
    Build,
    CutOff,
    Pending,
    Roster,
    Waiter,
    acknowledgement,
    apply_push,
    apply_sync,
    raise_failure,
    record_late_write,
    wait_sliced,
)
from .config import NodeConfig, loader_command, parse_listen
from .errors import (
    AuthenticationError,
    ConfigError,
    LoaderUnavailable,
    LocalProtocolError,
    NameClashError,
    ProtocolError,
    ValueTooLarge,
)
from .hello import HEARTBEAT, check_welcome, handshake_meta, incompatibility
from .liveness import watch
from .messages import (
    VALUE,
    Await,
    Commit,
    Define,
    Delete,
    Deleted,
    Failed,
    Fetch,
    History,
    Load,
    Loaded,
    Message,
    Pushes,
    Put,
    Queued,
    Reclaim,
    Status,
    Sync,
    SyncReply,
)
from .poll_windows import POLL_FOR
from .protocol import BULK, Connection, Role, State, Welcome
from .readers import TICK, SharedReader, shared_reader
from .replica import Replica

__all__ = ["MemberClient"]

log = logging.getLogger(__name__)
# Tags on the records of the link to the loader, for front-ends that say it themselves
# (with the node's name as ``node``).
UNREACHABLE = "unreachable"
LOST = "lost"

BACKOFF_FIRST = 0.05
BACKOFF_CAP = 2.0
RECV_SIZE = 1 << 20
RECV_WAIT = 0.25
LINGER = 0.002
# The longest the shared reader stays away while callers read their own answers one after
# another (see readable): pushes to a node whose requests just stopped wait at most this.
STAY_AWAY = 10 * LINGER
# How long a caller polls for its answer before sleeping (see _receive): as long as the
# loader polls after a request.
SPIN = POLL_FOR
RESUME_AFTER = STAY_AWAY  # a caller read this long: resume the shared reader at once
RELAYED = (
    ", or, over TLS, something between this node and the loader relays the connection "
    "(the cookie is proven on one TLS session only): check the loader's address"
)


_WRITES = (Put, Commit, Delete)  # their writer applies its own answer: see _late_answer


def _receive(sock: socket.socket, buffer: mmap.mmap | memoryview, size: int, block: bool) -> int:
    """One ``recv_into``; -1 if nothing came. ``block``: poll for up to SPIN seconds first
    (an answer usually comes sooner, and sleeping and waking again would cost more than
    the wait), then sleep in recv until data or the socket's receive timeout."""
    spin_until = time.perf_counter() + SPIN if block else 0.0
    while True:
        try:
            return sock.recv_into(buffer, size, tls.DONTWAIT)
        except BlockingIOError:
            if time.perf_counter() >= spin_until:
                break
            os.sched_yield()  # a process that shares this CPU (the loader?) runs first
    if not block:
        return -1
    try:
        return sock.recv_into(buffer, size)
    except (BlockingIOError, TimeoutError):
        return -1


def _close_for_good(sock: socket.socket) -> None:
    """Close ``sock``, shut down first: the loader hears of it even if a forked child
    holds a copy."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _buffered(sock: socket.socket) -> bool:
    """Whether TLS may hold records of ``sock`` that no poll would report."""
    return isinstance(sock, tls.TLSSocket) and sock.pending() > 0


class _ThreadState(threading.local):
    """Per thread: whether it is applying a hot-load (a class default, so that reading it
    in a thread that never set it costs no AttributeError)."""

    dispatching = False


class _Lost(Exception):
    """The connection ended; the reader reconnects."""


class _Unsent(Exception):
    """A caller's request was not sent: its connection was replaced since it was numbered
    (the new one has not resynced, or its answer would reach nobody). It is sent anew
    once connected."""


class _Standby(_Lost):
    """The loader there stands by; ``active`` is where it says the active one is."""

    def __init__(self, message: str, active: str) -> None:
        super().__init__(message)
        self.active = active


def _retryable(message: Message | None) -> bool:
    """Whether a request cut off by a takeover may be sent again to the next loader: reads,
    an unforced definition (unchanged source makes no new version) and a leaseholder's
    commit (the loader takes the same value from the same node once)."""
    kind = type(message)
    if kind is Fetch:
        return not message.lease  # type: ignore[union-attr]
    if kind is Define:
        return not message.force  # type: ignore[union-attr]
    return kind in (Status, History, Commit)


def _too_large(exc: LocalProtocolError) -> ValueTooLarge:
    return ValueTooLarge(f"{exc}; {codec.RAISE_THE_LIMIT}")


class _Following:
    """One connection of a member, as the shared reader reads it."""

    __slots__ = ("client", "sock")

    def __init__(self, client: MemberClient, sock: socket.socket) -> None:
        self.client = client
        self.sock = sock

    def readable(self, retry: bool) -> float | None:
        return self.client.readable(self.sock, retry)

    def due(self, now: float) -> bool:
        return self.client.due(now)

    def ended(self, error: BaseException) -> None:
        self.client.ended(self.sock, error)

    def __repr__(self) -> str:
        return f"<following {self.client.config.name}>"


class MemberClient:
    """A member node's channel to its loader (see the module docstring)."""

    def __init__(
        self,
        config: NodeConfig,
        replica: Replica,
        changed: Callable[[], None],
        leases: dict[str, int] | None = None,
    ) -> None:
        """``leases``: the node's leases whose fn runs, key -> token (kept by the node)."""
        assert config.loader is not None
        self.config = config
        self.loader = config.loader
        self._target = (config.loader.host, config.loader.port)  # the one tried next
        self.replica = replica
        self.changed = changed
        self._leases = {} if leases is None else leases
        self._roster = Roster()
        self.pending = Pending()
        self._session = secrets.token_hex(8)
        self._sock: socket.socket | None = None
        self._conn: Connection | None = None
        self._retired: socket.socket | None = None  # dropped, closed once the next one is up
        self._retired_at = 0.0
        self._send_lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._tls = _ThreadState()
        # Anonymous memory, mapped as reads fill it: a node that reads small frames touches
        # a page or two of it, where a bytearray would zero all of it (about 1 ms and 1 MiB
        # of RSS a node, a second and a gigabyte for a thousand nodes). Private, as a
        # bytearray is: a forked child's reads do not land in its parent's buffer. In small
        # pages even where the kernel gives huge ones to all memory (THP "always"), which
        # would fault in 2 MiB on the first read.
        self._recv_buffer = mmap.mmap(-1, RECV_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(AttributeError, OSError):  # not Linux: nothing to ask
            self._recv_buffer.madvise(mmap.MADV_NOHUGEPAGE)
        self._recv_view = memoryview(self._recv_buffer)
        self._ready = threading.Condition()
        self._is_ready = False
        self._stopping = False
        self._last_error: BaseException | None = None
        self._last_heard = self._last_sent = time.monotonic()
        self._last_answer = 0.0
        # The request the io lock's holder is reading for (see _request_reading).
        self._mine = 0
        self._received = 0  # reads of anything but heartbeats: progress of a long answer
        self._bulk_reads = 0  # reads into a big payload arriving: an answer on its way
        self._store: object = None  # the identity of the loader's store, once resynced
        self._takes_not_loaded = False  # the loader's welcome says it understands NotLoaded
        self._reclaims = False  # ... and Reclaim and Await: a lease outlives a connection
        self._answer: Message | None = None
        self._behind = ""  # whose lease the io lock holder's request is queued behind
        self._drops = 0  # connections dropped so far: did one end while a request waited?
        self._abandoned: dict[int, Message] = {}  # writes whose callers stopped waiting
        self._patient = False
        self._followed: socket.socket | None = None  # the socket the shared reader reads
        self._watch: tuple[SharedReader, int, _Following] | None = None
        self._held_since = 0.0  # when the caller reading its own answer began
        self._busy_since = 0.0  # when callers began reading answers, one after another
        self._ended = threading.Event()  # the connection ended: reconnect
        self._ended_by: BaseException | None = None
        files = tls.node_files(config)
        self._context = None if files is None else tls.client_context(files)  # or ConfigError
        self._thread = threading.Thread(
            target=self._run, name=f"clustorage-member-{config.name}", daemon=True
        )

    @property
    def connected(self) -> bool:
        return self._is_ready

    @property
    def last_error(self) -> str:
        error = self._last_error
        return "" if self._is_ready or error is None else str(error)

    @property
    def members(self) -> tuple[str, ...]:
        return self._roster.names()

    def where(self) -> str:
        return str(self.loader)

    def unavailable(self, why: str) -> LoaderUnavailable:
        """The LoaderUnavailable a caller sees, naming the loader and how to start it with
        this node's cookie (and the data directory of $CLUSTORAGE_DATA, if set)."""
        loader = self.loader
        command, cookie = loader_command(self.config)
        if loader.standbys:  # loaders on one PostgreSQL store: none of them is active
            return LoaderUnavailable(
                f"no active loader among {loader} ({why}); a standby takes over within "
                f"dead_after, or start one with '{command}' on a listed address"
            )
        same = f" and the cookie of {cookie}" if cookie else ""
        return LoaderUnavailable(
            f"the loader {loader} is unavailable ({why}); start it with '{command}'{same}, "
            f"or check --loader"
        )

    # -- connecting ------------------------------------------------------------------------

    def start(self) -> None:
        """Connect once in the foreground, then keep the connection up in the background.

        Raises:
            AuthenticationError, NameClashError, ConfigError: the loader refused us; retrying
                would not help.
        """
        try:
            self._connect()
        except (AuthenticationError, NameClashError, ConfigError):
            raise
        except (OSError, ProtocolError, _Lost) as exc:
            log.warning(
                "%s: cannot reach the loader %s yet (%s)",
                self.config.name,
                self.where(),
                exc,
                extra={"loader_link": UNREACHABLE, "node": self.config.name},
            )
            self._last_error = exc
            self._drop(str(exc))
        self._thread.start()

    def _connect(self) -> None:
        """Connect to the listed loaders in turn, following a standby to the active one."""
        addresses = self.loader.addresses
        error: BaseException | None = None
        for _ in range(len(addresses) + 1):
            try:
                self._connect_to(self._target)
                return
            except _Standby as exc:
                error = exc
                self._target = self._after(exc.active)
            except (OSError, _Lost) as exc:
                error = exc
                self._drop(str(exc))  # made, then failed its resync: not left open
                self._target = self._after("")
            if len(addresses) == 1:
                break
        assert error is not None
        raise error

    def _after(self, active: str) -> tuple[str, int]:
        """The address to try next: the active loader a standby named, if listed, else the
        next listed one."""
        addresses = self.loader.addresses
        with contextlib.suppress(ConfigError):
            named = parse_listen(active) if active else None
            if named in addresses:
                return named
        at = addresses.index(self._target) if self._target in addresses else -1
        return addresses[(at + 1) % len(addresses)]

    def _connect_to(self, target: tuple[str, int]) -> None:
        loader = self.loader
        timeout = self.config.timeout
        sock = socket.create_connection(target, timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            watch(sock, self.config.dead_after)
            if self._context is not None:
                sock = tls.connect(self._context, sock, target[0], self.where())
            meta = handshake_meta(
                self.config.name, role="member", session=self._session, expect=loader.name
            )
            conn = Connection(
                Role.CLIENT,
                self.config.cookie.secret,
                meta,
                max_frame=self.config.max_frame,
                binding=tls.channel_binding(sock),
            )
            welcome = self._handshake(sock, conn, meta, timeout)
            sock.settimeout(None)
            seconds, fraction = divmod(RECV_WAIT, 1)
            sock.setsockopt(
                socket.SOL_SOCKET,
                socket.SO_RCVTIMEO,
                struct.pack("ll", int(seconds), int(fraction * 1_000_000)),
            )
        except BaseException:
            sock.close()
            raise
        self._takes_not_loaded = bool(welcome.get("not_loaded"))
        self._reclaims = bool(welcome.get("reclaims"))
        with self._send_lock:
            if self._reclaims:  # the connection's first frame: no other thread's goes before
                # it. Even naming none: the loader then knows which of ours ended meanwhile.
                held_leases = Reclaim(tuple(self._leases.copy().items()))
                sock.sendall(conn.send_small(*messages.encode_parts(held_leases)))
            self._sock, self._conn = sock, conn
            # Welcomed: this connection replaced it at the loader. Taken with the swap: a
            # drop of this one from now on retires this one.
            retired, self._retired = self._retired, None
        if retired is not None:
            _close_for_good(retired)
        self._last_heard = self._last_sent = time.monotonic()
        self._roster.reset((str(welcome.get("name", loader.name)),))
        store = welcome.get("store")
        if self._store is not None and store != self._store:
            # Another store (a loader that kept nothing, or another data file) numbers its
            # versions afresh: none of ours is one of its, whatever the number says.
            held = self.replica.forget_versions()
        else:
            held = self.replica.held()
        self._store = store  # from now on, what arrives is numbered by this store
        self._abandoned.clear()  # the resync brings what their answers would have
        rid, waiter = self.pending.open()
        self._send(Sync(rid, held))
        deadline = time.monotonic() + timeout
        with self._io_lock:
            while not waiter.done:
                if time.monotonic() > deadline:
                    raise _Lost(f"no answer to resync within {timeout:g}s")
                received = self._received
                self._read_once(block=True)
                if self._received != received:  # big entries take long to arrive, not to start
                    deadline = time.monotonic() + timeout
        reply = waiter.reply
        if waiter.error is not None:
            raise waiter.error
        if not isinstance(reply, SyncReply):
            raise _Lost(f"the loader answered resync with {type(reply).__name__}")
        with self._ready:
            self._is_ready = True
            self._ready.notify_all()
        log.info(
            "%s: connected to %s (%d nodes)", self.config.name, self.where(), len(self.members)
        )
        self.changed()

    def _handshake(
        self, sock: socket.socket, conn: Connection, meta: dict[str, object], timeout: float
    ) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Lost(f"no handshake from {self.where()} within {timeout:g}s")
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except ssl.SSLError as exc:
                raise tls.refusal(exc, self.where()) from None
            if self._context is None and conn.state is State.AWAIT_CHALLENGE:
                tls.check_reply(data, self.where())
            conn.receive_data(data)
            try:
                event = conn.next_event()
            except AuthenticationError as exc:
                if not conn.rejected:  # its welcome failed the MAC: an impostor, or tampering
                    raise AuthenticationError(
                        f"the loader at {self.where()} did not prove it knows the cookie "
                        f"(wrong cookie there, or someone in between)"
                    ) from exc
                relayed = "" if conn.tagged else RELAYED
                raise AuthenticationError(
                    f"the loader {self.where()} refused our cookie; use the cluster's "
                    f"cookie (--cookie, --cookie-file, $CLUSTORAGE_COOKIE or ~/.clustorage/cookie)"
                    f"{relayed}"
                ) from exc
            sock.sendall(conn.data_to_send())
            if isinstance(event, Welcome):
                return self._check_welcome(dict(event.meta), meta)
            if not data:
                raise _Lost("the loader closed the connection during the handshake")

    def _check_welcome(
        self, welcome: dict[str, object], meta: dict[str, object]
    ) -> dict[str, object]:
        error = welcome.get("error")
        kind = welcome.get("kind")
        if kind == "name_clash":
            raise NameClashError(str(error))
        if kind == "standby":
            raise _Standby(str(error), str(welcome.get("active") or ""))
        check_welcome(welcome, self.loader)
        problem = incompatibility(meta, welcome)
        if problem:
            raise ConfigError(problem)
        return welcome

    # -- the reader thread -----------------------------------------------------------------

    def _run(self) -> None:
        backoff = BACKOFF_FIRST
        while not self._stopping:
            if self._is_ready:
                try:
                    self._follow()
                except (_Lost, OSError, ValueError, ProtocolError) as exc:
                    if not self._stopping:
                        self._say_lost(exc)
                self._drop(str(self._last_error or "connection lost"))
                backoff = BACKOFF_FIRST
                continue
            try:
                self._connect()
                backoff = BACKOFF_FIRST
            except (
                OSError,
                ProtocolError,
                _Lost,
                AuthenticationError,
                NameClashError,
                ConfigError,
            ) as exc:
                self._last_error = exc
                self._drop(str(exc))
                log.debug("%s: reconnect failed: %s", self.config.name, exc)
                # No next connection to replace the last one at the loader: after as long
                # as a dead host is waited for, it closes, and the node's leases pass on.
                self._close_retired(older_than=self.config.dead_after)
                time.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_CAP)

    def _follow(self) -> None:
        """While connected, the process's shared reader reads the pushes (see
        :mod:`clustorage.readers`); this thread waits for the connection to end."""
        sock = self._sock
        if sock is None:
            raise _Lost("not connected")
        self._ended.clear()
        self._ended_by = None
        self._followed = sock
        following = _Following(self, sock)
        reader = shared_reader()
        fd = reader.watch(sock, following)
        self._watch = (reader, fd, following)
        try:
            while not self._stopping and self._sock is sock:
                if self._ended.wait(HEARTBEAT):
                    break
        finally:
            self._watch = None
            reader.forget(fd, following)
            self._followed = None
        if self._ended_by is not None:
            raise self._ended_by

    def readable(self, sock: socket.socket, retry: bool) -> float | None:
        """Read what arrived on ``sock``, for the shared reader; or, while a caller waits
        for its answer or just had it, the seconds until it tries again. The caller reads
        its answer itself: a second thread woken by every answer would cost each request
        two thread switches."""
        now = time.monotonic()
        if not retry and not self.pending.busy() and now - self._last_answer < LINGER:
            return self._away(now)  # the caller of a run of requests reads what comes next
        if not self._io_lock.acquire(blocking=False):
            # A caller reads meanwhile: come back in a while, the longer it has been at it
            # (one waiting for another node's fn may take minutes), then it resumes us.
            held = self._held_since
            return min(max(self._away(now), (now - held) / 2), TICK) if held else LINGER
        try:
            if sock is not self._sock or sock is not self._followed:
                raise _Lost("the connection was dropped")
            self._read_once(block=False)
            while _buffered(sock):
                self._read_once(block=False)
        finally:
            self._io_lock.release()
        return None

    def _away(self, now: float) -> float:
        """How long the shared reader stays away from a connection whose callers read
        their own answers: the longer they have kept at it, the longer, up to STAY_AWAY.
        Each time it comes back to find one at it costs both threads a switch (a tight
        loop of puts lost a quarter of its speed to that, with a fixed LINGER)."""
        return min(max(LINGER, (now - self._busy_since) / 2), STAY_AWAY)

    def _take_io(self) -> bool:
        """Whether this caller may read its answer itself (then :meth:`_release_io`); Ctrl-C
        is held back meanwhile, to safe points (see clustorage.interrupts)."""
        interrupts.hold()
        if not self._io_lock.acquire(blocking=False):
            interrupts.release()
            return False
        self._held_since = now = time.monotonic()
        if now - self._last_answer > LINGER:  # not the next of a run of requests
            self._busy_since = now
        return True

    def _release_io(self) -> None:
        """A caller is done reading: after a long wait, or while other callers wait for
        answers that nobody reads now, the shared reader, which stepped aside meanwhile,
        reads this connection again at once (not after every request: that would wake it
        for every answer)."""
        held, self._held_since = self._held_since, 0.0
        self._io_lock.release()
        try:
            self._last_answer = now = time.monotonic()
            watch = self._watch
            if watch is not None and (now - held > RESUME_AFTER or self.pending.busy()):
                reader, fd, following = watch
                reader.resume(fd, following)
        finally:
            interrupts.release()  # a Ctrl-C that came meanwhile is raised here

    def due(self, now: float) -> bool:
        """Whether a heartbeat is due (the shared reader then calls :meth:`readable`)."""
        return now - self._last_sent >= HEARTBEAT

    def ended(self, sock: socket.socket, error: BaseException) -> None:
        """The shared reader's read of ``sock`` failed: this node's thread reconnects,
        unless it has done so already."""
        if sock is self._followed:
            self._ended_by = error
            self._ended.set()

    def _read_once(self, block: bool) -> None:
        """One read (holding the io lock), up to RECV_WAIT long if ``block``; idle: heartbeat.

        A blocking read is one recv call: the socket's receive timeout (SO_RCVTIMEO) bounds
        it, while sends stay fully blocking.
        """
        sock, conn = self._sock, self._conn
        if sock is None or conn is None:
            raise _Lost("not connected")
        space = conn.receive_buffer()
        if space is None:  # else straight into a big payload that is arriving
            size = _receive(sock, self._recv_buffer, RECV_SIZE, block)
        else:
            size = _receive(sock, space, len(space), block)
        now = time.monotonic()
        if size > 0 and space is not None:
            self._last_heard = now
            self._received += 1
            self._bulk_reads += 1
            ended = conn.received_into(size)
            if ended is not None:
                self._dispatch(messages.decode(ended))
        elif size > 0:
            self._last_heard = now
            for payload in conn.read_frames(self._recv_view[:size]):
                self._received += 1
                self._dispatch(messages.decode(payload))
        elif size == 0:  # the end: told once by Closed, and again by every later read
            conn.receive_data(b"")
            while conn.next_event() is not None:
                pass
            raise _Lost("the loader closed the connection")
        # No heartbeat while another thread sends (it proves life as well): this may be the
        # process's shared reader, which must not wait behind a big upload.
        if now - self._last_sent >= HEARTBEAT and self._send_lock.acquire(blocking=False):
            try:
                sock.sendall(conn.heartbeat())
            finally:
                self._send_lock.release()
            self._last_sent = now

    def _dispatch(self, message: Message) -> None:
        if type(message) is Pushes:  # a fan-out pass's pushes, applied in one go
            self._apply(lambda: self._push(map(messages.decode, message.frames)))
            return
        rid = getattr(message, "rid", None)
        if rid is not None:
            if type(message) is SyncReply:  # applied in its place: later pushes go on top
                self._apply(lambda: self._resync(message))
            if rid != self._mine:
                if not self.pending.resolve(rid, message) and type(message) is not Queued:
                    sent = self._abandoned.pop(rid, None)
                    if sent is not None:
                        self._apply(lambda: self._late_answer(sent, message))
            elif type(message) is Queued:
                self._patient, self._behind = True, message.holder
                self.pending.note_queued(rid, message)
            else:
                self._answer = message
            return
        self._apply(lambda: self._push((message,)))

    def _resync(self, reply: SyncReply) -> None:
        apply_sync(self.replica, reply)
        self._roster.reset(reply.members)

    def _push(self, pushed: Iterable[Message]) -> None:
        """Apply pushes from the loader, acknowledging each definition once installed;
        on_change once if the membership changed."""
        joined = False
        for message in pushed:
            if apply_push(self.replica, message):
                self._roster.merge(message)  # type: ignore[arg-type]
                joined = True
            elif type(message) is Load and message.ack:
                answer = acknowledgement(self.replica, message.entry)
                if type(answer) is Loaded or self._takes_not_loaded:  # else: missing, later
                    self._acknowledge(answer)
        if joined:
            self.changed()

    def _acknowledge(self, answer: Message) -> None:
        """Send an acknowledgement, by a thread of its own while another thread sends: this
        may be the process's shared reader, which must not wait behind an upload (it would
        read no other node's connection meanwhile)."""
        self.notify(lambda _: answer)

    def _gave_up(self, rid: int, sent: Message, answer: Message | None) -> None:
        """A caller stopped waiting (Ctrl-C) for the answer to a write it sent."""
        if answer is not None:
            self._apply(lambda: self._late_answer(sent, answer))
            return
        if isinstance(sent, Put | Commit):  # what it was, not its bytes: a late answer has them
            sent = sent._replace(payload=b"")
        self._abandoned[rid] = sent

    def _late_answer(self, sent: Message, answer: Message) -> None:
        """A write done for a caller that stopped waiting: its node applies it all the same,
        for the fan-out leaves the writer out. A value's bytes come on the next get."""
        record_late_write(self.replica, answer)
        if type(answer) is Deleted and type(sent) is Delete:
            self.replica.remove(sent.kind, sent.key, answer.version, self.config.name)

    def _apply(self, change: Callable[[], None]) -> None:
        """Apply a change from the loader, listeners (on_load, on_change) refusing blocking
        calls meanwhile: this thread is the one that would read their answers."""
        self._tls.dispatching = True
        try:
            change()
        finally:
            self._tls.dispatching = False

    def _drop(self, why: str, only: socket.socket | None = None, drops: int | None = None) -> None:
        """End the connection (kept open a while: see below) and fail what waits on it;
        only if that is still the connection ``only``, or the one of drop count ``drops``
        (else one made since would be dropped for an old one's fault)."""

        def replaced() -> bool:
            return (only is not None and self._sock is not only) or (
                drops is not None and self._drops != drops
            )

        with self._ready:  # first: no socket always means not ready
            if replaced():
                return
            was_ready, self._is_ready = self._is_ready, False
        with self._send_lock:
            if replaced():
                return  # dropped by another thread in between: not ready, and not ours
            sock, conn = self._sock, self._conn
            # As it ends, the requests open on it, before the count that numbers them moves
            # on: one opened after (the next connection's resync, or one numbered while none
            # was up) is not this connection's to fail, nor the membership that the next
            # one's welcome brings its to forget.
            stranded = self.pending.take_all() if sock is not None else []
            if was_ready:
                self._roster.reset(())
            self._sock = self._conn = None
            self._drops += sock is not None
            # Not closed yet: to a loader that still holds it (a frame cut short, a resync
            # that took too long), closing it would say this node left, and its leases
            # would pass on while its threads still compute them. The next connection
            # replaces it there, the leases waiting for it to reclaim them; then it closes.
            closing = None
            if sock is not None and not self._stopping:
                closing, self._retired, self._retired_at = self._retired, sock, time.monotonic()
            elif sock is not None:
                closing = sock  # the node stops: it leaves
        self._ended.set()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)  # wakes a reader waiting on it at once
        if closing is not None:  # this one, or one kept before that nothing replaced
            _close_for_good(closing)
        if conn is not None:
            conn.release()
        lost = self.unavailable(why)
        for waiter in stranded:
            waiter.set(error=lost)
        if was_ready:
            if threading.current_thread() is self._thread:  # the one that would reconnect
                self._apply(self.changed)
            else:
                self.changed()

    # -- requests --------------------------------------------------------------------------

    def _send(self, message: Message, drops: int | None = None) -> None:
        """Send ``message``; a caller's request (``drops``: the count it was numbered at)
        only on that connection, ready: else _Unsent."""
        if type(message) is Await and not self._reclaims:  # a loader of an earlier release
            message = Fetch(message.rid, VALUE, message.key, True, message.holding)
        envelope, blob = messages.encode_parts(message)
        sending: socket.socket | None = None  # the connection a frame went out on
        interrupts.hold()  # a Ctrl-C only where asked for: while waiting, or between parts
        try:
            try:
                while not self._send_lock.acquire(timeout=SLICE):  # another thread sends
                    if not self._tls.dispatching:  # not an acknowledgement of what was read:
                        interrupts.check()  # nothing sent yet
                try:
                    sock, conn = self._sock, self._conn
                    if drops is not None and (
                        sock is None or drops != self._drops or not self._is_ready
                    ):  # a count taken while none was up is the next connection's too
                        raise _Unsent("the connection to the loader was replaced meanwhile")
                    if sock is None or conn is None:
                        raise self.unavailable("not connected")
                    if conn.state is not State.OPEN:  # the loader closed it; the reader reconnects
                        raise self.unavailable(f"the connection is {conn.state.value}")
                    if len(blob) < BULK:  # one small frame, made whole (or a LocalProtocolError)
                        frame = conn.send_small(envelope, blob)
                        sending = sock
                        sock.sendall(frame)
                    else:
                        parts = conn.send_message(envelope, blob)  # over the limit: raises here
                        sending = sock
                        try:
                            for number, part in enumerate(parts):
                                if number:  # a long upload: Ctrl-C cuts it short
                                    interrupts.check()  # (after the last part: held)
                                sock.sendall(part)
                        finally:  # a frame cut short: its hashing thread ends now
                            if (close := getattr(parts, "close", None)) is not None:
                                close()
                    self._last_sent = time.monotonic()
                finally:
                    self._send_lock.release()
            except BaseException as exc:
                if sending is not None and not isinstance(exc, OSError):  # Ctrl-C mid-frame:
                    why = f"a frame was cut short by {type(exc).__name__}"
                    self._drop(why, only=sending)  # and reconnect
                raise
        finally:
            interrupts.release()

    def _wait_ready(self, timeout: float) -> None:
        if self._is_ready:
            return
        with self._ready:
            if not wait_sliced(  # nothing sent yet: a Ctrl-C held back may end it
                lambda seconds: self._ready.wait_for(
                    lambda: self._is_ready or self._stopping, seconds
                ),
                timeout,
                interrupts.check,
            ):
                why = self._last_error or f"not connected after {timeout:g}s"
                raise self.unavailable(str(why))
        if self._stopping:
            raise self.unavailable("this node is stopping")

    def _check_thread(self) -> None:
        if self._tls.dispatching:
            raise RuntimeError(
                "a blocking clustorage call was made while applying a hot-load "
                "(from an on_load listener?); hand the work to another thread"
            )

    def _read_until(
        self, answered: Callable[[], bool], timeout: float, patient: Callable[[], bool]
    ) -> float:
        """Read (holding the io lock) until ``answered()``, the connection drops, or
        ``timeout`` seconds pass while not ``patient()`` and no big payload arrives (it
        comes before any answer sent after it, and may take longer than a timeout to
        arrive); the seconds left."""
        deadline = time.monotonic() + timeout
        while not answered() and self._is_ready:
            if not patient() and time.monotonic() > deadline:
                break
            bulk_reads = self._bulk_reads
            self._read_once(block=True)
            if self._bulk_reads != bulk_reads:
                deadline = time.monotonic() + timeout
            if not answered():
                interrupts.check()  # all read is handled: Ctrl-C may end the wait here
        return deadline - time.monotonic()

    def _arriving(self) -> Callable[[], bool]:
        """Whether a big payload arrived further since the last time the result was asked:
        for a request whose answer another thread reads."""
        seen = self._bulk_reads

        def moved() -> bool:
            nonlocal seen
            before, seen = seen, self._bulk_reads
            return seen != before

        return moved

    def _lost(self, exc: BaseException, drops: int) -> None:
        """A caller's read or send failed on the connection it started on (``drops``: the
        count then). Dropped, unless that connection is gone already: a new one may be up
        by now, which the failure is no news of (the caller was slow to get here)."""
        if self._drops != drops:
            log.debug("%s: a dropped connection failed: %s", self.config.name, exc)
            return
        self._say_lost(exc)
        self._drop(str(exc), drops=drops)

    def _close_retired(self, older_than: float = 0.0) -> None:
        """Close the connection dropped last (see :meth:`_drop`), if dropped ``older_than``
        seconds ago or more."""
        with self._send_lock:
            retired = self._retired
            if retired is None or time.monotonic() - self._retired_at < older_than:
                return
            self._retired = None
        _close_for_good(retired)

    def _say_lost(self, exc: BaseException) -> None:
        link = {"loader_link": LOST, "node": self.config.name}  # see clustorage.magics
        log.warning("%s: lost the loader %s (%s)", self.config.name, self.where(), exc, extra=link)

    def _await(self, rid: int, waiter: Waiter, timeout: float, drops: int) -> Message:
        """Wait for the answer to ``rid`` (sent when the drop count was ``drops``), reading
        the socket ourselves when nobody else is.

        Reading our own answer saves a thread switch on every request; when another
        thread is reading, it hands us the answer instead.
        """
        remaining = timeout
        if self._take_io():
            try:
                remaining = self._read_until(lambda: waiter.done, timeout, lambda: waiter.queued)
            except (_Lost, OSError, ProtocolError) as exc:
                self._lost(exc, drops)
            finally:
                self._release_io()
        self._last_answer = time.monotonic()
        return self.pending.wait(
            rid,
            waiter,
            max(remaining, 0.0),
            lambda: self._is_ready,
            whole=timeout,
            arriving=self._arriving(),
            safe_point=interrupts.check,
        )

    def request(self, build: Build, timeout: float, patient: bool = False) -> Message:
        """Send a request and wait for its answer (a ``patient`` one while connected).

        A leaseholder's commit cut off (by a restart of the loader, say) is sent again on
        each next connection made within ``timeout`` and ``dead_after`` of its first failure
        (the loader may restart more than once meanwhile): the value it computed is not
        lost. One that got no answer in time on a connection still up is sent once more.
        With standbys listed, so is any request cut off by a takeover where that is safe
        (see :func:`_retryable`).

        Raises:
            LoaderUnavailable: not connected within ``timeout``, or no answer in time.
        """
        sent: list[Message] = []

        def remember(rid: int) -> Message:
            sent.append(build(rid))
            return sent[-1]

        deadline, timed_out = 0.0, False
        while True:
            try:
                return self._request(remember, timeout, patient)
            except LoaderUnavailable as exc:
                if self._stopping or not sent or not _retryable(sent[-1]):
                    raise
                if not self.loader.standbys and type(sent[-1]) is not Commit:
                    raise
                now = time.monotonic()
                deadline = deadline or now + timeout + self.config.dead_after
                if now >= deadline or (timed_out and not isinstance(exc, CutOff)):
                    raise
                timed_out |= not isinstance(exc, CutOff)
                kind = type(sent[-1]).__name__
                log.info("%s: retrying a %s (%s)", self.config.name, kind, exc)
                self._wait_ready(deadline - now)

    def _request(self, build: Build, timeout: float, patient: bool) -> Message:
        """Send and wait up to ``timeout`` for the answer. A request refused before it went
        out (its connection was replaced meanwhile) goes on the next connection once that is
        ready (waited for within ``timeout``), and waits the whole ``timeout`` there too."""
        self._check_thread()
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._request_once(build, timeout, patient)
            except _Unsent:
                pass  # waited for below, outside the handler: not a cause of what it raises
            self._wait_ready(max(deadline - time.monotonic(), 0.0))

    def _request_once(self, build: Build, timeout: float, patient: bool) -> Message:
        # Not while another thread sends (a big upload): this caller would hold the io lock
        # while it waits to send, and nobody would read the connection meanwhile.
        if self._is_ready and not self._send_lock.locked() and self._take_io():
            try:
                answer = self._request_reading(build, timeout, patient)
            finally:
                self._release_io()
            if type(answer) is Failed:
                raise_failure(answer)
            return answer
        self._wait_ready(timeout)
        drops = self._drops  # before the waiter: a drop after it fails the waiter too
        rid, waiter = self.pending.open(patient)
        sent: Message | None = None
        interrupts.hold()  # not half a frame, nor a request sent and forgotten
        try:
            sent = build(rid)
            self._send(sent, drops)
        except BaseException as exc:  # not sent, or cut short: nothing waits for an answer
            self.pending.discard(rid)
            interrupts.release()
            if isinstance(exc, LocalProtocolError):
                raise _too_large(exc) from None
            if isinstance(exc, OSError):  # a broken pipe, say, or a connection closed
                cut = self._failed(exc, "", drops)
                if cut is exc:
                    raise
                raise cut from exc
            raise  # _Unsent goes on the next connection
        try:
            interrupts.release()  # a Ctrl-C that came as it was sent: raised here
            try:
                return self._await(rid, waiter, timeout, drops)
            except LoaderUnavailable as exc:
                raise self._cut_off(exc, waiter.holder, drops) from None
        except BaseException:
            if sent is not None and type(sent) in _WRITES:
                self._gave_up(rid, sent, None)
                self.pending.discard(rid)
                if waiter.done and waiter.reply is not None:  # it came as we gave up
                    self._abandoned.pop(rid, None)
                    self._gave_up(rid, sent, waiter.reply)
            raise

    def _request_reading(self, build: Build, timeout: float, patient: bool) -> Message:
        """The common case, holding the io lock: send, then read until our own answer.

        No other thread can read our answer meanwhile, so it needs no Waiter: the reader
        keeps it aside (see :meth:`_dispatch`).
        """
        rid = self.pending.number()
        self._mine, self._answer, self._patient, self._behind = rid, None, patient, ""
        drops = self._drops
        sent: Message | None = None
        answer: Message | None = None
        try:
            request = build(rid)
            try:
                self._send(request, drops)
            except LocalProtocolError as exc:  # nothing sent: the connection is fine
                raise _too_large(exc) from None
            sent = request  # whole: not cut short by a Ctrl-C or a failure, nor refused
            self._read_until(lambda: self._answer is not None, timeout, lambda: self._patient)
            answer = self._answer
        except (_Lost, OSError, ProtocolError) as exc:
            if isinstance(exc, CutOff):  # its connection is gone already
                raise
            cut = self._failed(exc, self._behind, drops)
            if cut is exc:
                raise
            raise cut from exc
        finally:
            if answer is None and sent is not None and type(sent) in _WRITES:
                self._gave_up(rid, sent, self._answer)
            self.pending.queued.pop(rid, None)
            self._mine, self._answer = 0, None
        if answer is not None:
            return answer
        if not self._is_ready:
            lost = self.unavailable(str(self._last_error or "connection lost"))
            raise self._cut_off(lost, self._behind, drops)
        # A slow loader is not a dead one (liveness is the operating system's): the
        # connection and its leases stay, and a late answer is handled as abandoned.
        raise LoaderUnavailable(f"no answer from the loader within {timeout:g}s")

    def _failed(self, exc: BaseException, holder: str, drops: int) -> LoaderUnavailable:
        """What a request sent (or being sent) on the connection of drop count ``drops``
        raises when that connection failed it: the connection is dropped, unless it was
        already, and a CutOff says so (a leaseholder's commit, then, waits for the next
        connection, which reclaims the lease, rather than giving up)."""
        self._lost(exc, drops)
        said = exc if isinstance(exc, LoaderUnavailable) else self.unavailable(str(exc))
        return self._cut_off(said, holder, drops)

    def _cut_off(self, lost: LoaderUnavailable, holder: str, drops: int) -> LoaderUnavailable:
        """``lost`` as a CutOff when the request's connection ended (``drops``: the count
        when it was sent), naming ``holder`` if it was queued behind that node's lease; a
        get then asks again once connected. Not for a mere timeout: the request would
        still wait at the loader, and a lease granted it reach nobody."""
        if self._drops == drops or self._stopping or isinstance(lost, CutOff):
            return lost
        return CutOff(str(lost), holder)

    def notify(self, build: Build) -> None:
        """Send a message that has no answer, if connected. While another thread sends (a
        big upload to a slow loader, say), a thread of its own sends it, so that the caller
        (a get that Ctrl-C ended, withdrawing its request) does not wait for that."""
        message = build(0)
        if self._send_lock.locked():
            name = f"clustorage-notify-{self.config.name}"
            threading.Thread(target=self._notify, args=(message,), name=name, daemon=True).start()
        else:
            self._notify(message)

    def _notify(self, message: Message) -> None:
        try:
            self._send(message)
        except (OSError, LoaderUnavailable, ProtocolError) as exc:
            log.debug("%s: could not notify the loader: %s", self.config.name, exc)

    def close(self) -> None:
        """Disconnect and stop reconnecting."""
        self._stopping = True
        self._ended.set()
        with self._send_lock:
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._ready:
            self._ready.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5)
        self._drop("this node stopped")
        self._close_retired()  # the node leaves: its leases pass on
