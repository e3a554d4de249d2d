"""The loader's event loop: one thread, epoll (or poll), timers and calls from other threads.

It does what the loader needs from asyncio and no more: a listening socket, one stream per
member with a write buffer and flow control (``pause_writing``/``resume_writing`` around
high and low watermarks), timers, and ``call_soon_threadsafe``. A member's request is read,
handled and answered within one callback, with one ``recv`` and one ``send`` and nothing
between them but the loader's own code: asyncio's transports, handles and futures cost about
as much again per round trip (see bench/README.md, "Where the time goes"). After handling
events the loop keeps polling, without sleeping, for SPIN seconds: the next request of a
busy member usually arrives within that, and is then read without a wake-up.

Streams talk to a *protocol* object with asyncio's BufferedProtocol callbacks:
``connection_made``, ``get_buffer``, ``buffer_updated``, ``eof_received``,
``connection_lost``, ``pause_writing``, ``resume_writing``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import itertools
import logging
import os
import resource
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Reactor", "Server", "Stream", "StreamProtocol", "Timer", "untrusted_cap"]

log = logging.getLogger(__name__)

READ = select.POLLIN
WRITE = select.POLLOUT
_BROKEN = select.POLLERR | select.POLLHUP  # reported to both directions' handlers
IDLE_WAIT = 1.0
# After handling events the loop polls without sleeping for this long: a member's next
# request (the Commit after a lease, the next get) usually comes sooner, and going to sleep
# and being woken costs more than it, in latency and in cold caches.
SPIN = 50e-6
ACCEPT_PAUSE = 1.0  # after running out of file descriptors or memory
REPORT_EVERY = 10.0  # seconds between two log lines about connections refused for the cap


def untrusted_cap() -> int:
    """How many connections may wait for their protocol's trust at once: an eighth of this
    process's file descriptors (16 to 256), so that they never take the ones members need."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 256
    return max(16, min(256, soft // 8))


class StreamProtocol(Protocol):
    def connection_made(self, stream: Stream) -> None: ...

    def get_buffer(self, sizehint: int) -> memoryview: ...

    def buffer_updated(self, nbytes: int) -> None: ...

    def eof_received(self) -> bool | None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...


StreamFactory = Callable[["Reactor", socket.socket, StreamProtocol, "Server"], "Stream"]


class Timer:
    """A call scheduled with :meth:`Reactor.call_later`; :meth:`cancel` unschedules it."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.callback = _nothing  # what it would have called is free to go now, not when due


def _nothing() -> None:
    pass


class Reactor:
    """A poll loop run by one thread (:meth:`run_forever`); see the module docstring."""

    def __init__(self) -> None:
        # epoll where there is one (its masks are poll's), else poll: one system call and a
        # dict lookup per ready socket, without the selectors module's bookkeeping.
        epoll = getattr(select, "epoll", None)
        self._poller: Any = select.poll() if epoll is None else epoll()
        self._poll_unit = 1000.0 if epoll is None else 1.0  # poll takes ms, epoll seconds
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self.register(self._wake_read, READ, self._woken)
        self._thread: threading.Thread | None = None
        self._running = False
        self._closed = False

    # -- scheduling ------------------------------------------------------------------------

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Call ``callback(*args)`` on the loop thread, after the current callback."""
        self._calls.append(lambda: callback(*args))
        if threading.current_thread() is not self._thread:
            self._wake()

    call_soon_threadsafe = call_soon

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Call ``callback()`` on the loop thread in ``delay`` seconds (loop thread only)."""
        timer = Timer(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (timer.when, next(self._order), timer))
        return timer

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_write.send(b"\0")

    def _woken(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_read.recv(4096):
                pass

    # -- running ---------------------------------------------------------------------------

    def is_running(self) -> bool:
        return self._running

    def is_closed(self) -> bool:
        return self._closed

    def run_forever(self) -> None:
        """Run callbacks until :meth:`stop`; called by the one thread that owns the loop."""
        self._thread = threading.current_thread()
        self._running = True
        poll, unit, handlers = self._poller.poll, self._poll_unit, self._handlers
        calls, timers = self._calls, self._timers
        spin_until = 0.0
        try:
            while self._running:
                if calls or time.monotonic() < spin_until:
                    wait = 0.0
                elif timers:
                    wait = min(max(timers[0][0] - time.monotonic(), 0.0), IDLE_WAIT)
                else:
                    wait = IDLE_WAIT
                ready = poll(wait * unit)
                for fd, events in ready:
                    handler = handlers.get(fd)
                    if handler is not None:
                        self._guard(
                            handler, events | (READ | WRITE) if events & _BROKEN else events
                        )
                now = time.monotonic()
                if ready:
                    spin_until = now + SPIN
                elif wait == 0.0:
                    os.sched_yield()  # a member that shares this CPU runs first
                while timers and timers[0][0] <= now:
                    timer = heapq.heappop(timers)[2]
                    if not timer.cancelled:
                        self._guard(timer.callback)
                for _ in range(len(calls)):
                    self._guard(calls.popleft())
        finally:
            self._running = False

    @staticmethod
    def _guard(callback: Callable[..., Any], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("a loader callback failed")

    def stop(self) -> None:
        """Make :meth:`run_forever` return (from any thread)."""

        def stopping() -> None:
            self._running = False

        self.call_soon(stopping)

    def close(self) -> None:
        """Release the poller and the wake-up sockets (once the loop has stopped)."""
        if self._closed:
            return
        self._closed = True
        if hasattr(self._poller, "close"):
            self._poller.close()
        self._wake_read.close()
        self._wake_write.close()

    # -- sockets ---------------------------------------------------------------------------

    def register(self, sock: socket.socket, mask: int, handler: Callable[[int], None]) -> None:
        """Call ``handler(events)`` whenever ``sock`` is ready for ``mask`` (READ, WRITE)."""
        fd = sock.fileno()
        self._poller.register(fd, mask)
        self._handlers[fd] = handler

    def modify(self, sock: socket.socket, mask: int, handler: Callable[[int], None]) -> None:
        fd = sock.fileno()
        self._poller.modify(fd, mask)
        self._handlers[fd] = handler

    def unregister(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self._handlers.pop(fd, None) is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._poller.unregister(fd)

    def listen(
        self,
        host: str,
        port: int,
        protocol_factory: Callable[[], StreamProtocol],
        max_untrusted: int | None = None,
        stream: StreamFactory | None = None,
    ) -> Server:
        """Accept connections on ``host:port``, each a :class:`Stream` (or what ``stream``
        makes) to a new protocol; at most ``max_untrusted`` (default :func:`untrusted_cap`)
        not yet trusted at once."""
        return Server(self, host, port, protocol_factory, max_untrusted, stream)


class Server:
    """A listening socket whose connections become streams.

    A new stream is on probation until its protocol calls :meth:`Stream.trust` (a loader's
    connection: once the peer proved it knows the cookie). At most ``max_untrusted`` streams
    are on probation: each connection over that closes the oldest of them, so connections
    that never finish their handshake cannot take the file descriptors or the loop from
    members (SPEC "Wire and trust"), whose handshakes take a round trip.
    """

    def __init__(
        self,
        reactor: Reactor,
        host: str,
        port: int,
        protocol_factory: Callable[[], StreamProtocol],
        max_untrusted: int | None = None,
        stream: StreamFactory | None = None,
    ) -> None:
        self._reactor = reactor
        self._factory = protocol_factory
        self._stream: StreamFactory = Stream if stream is None else stream
        self.max_untrusted = untrusted_cap() if max_untrusted is None else max_untrusted
        self.untrusted: dict[Stream, None] = {}  # oldest first
        self._evicted = 0
        self._reported = 0.0
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.socket = sock
        reactor.register(sock, READ, self._accept)

    def _accept(self, mask: int) -> None:
        # Fewer than the cap at a time: a connection outlives the batch that accepted it, to
        # answer its challenge, even while the cap closes the oldest.
        for _ in range(max(1, min(64, self.max_untrusted // 2))):
            try:
                sock, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("cannot accept connections for a second: %s", exc)
                    self._reactor.unregister(self.socket)
                    self._reactor.call_later(ACCEPT_PAUSE, self._resume)
                else:
                    log.warning("accept failed: %s", exc)
                return
            while len(self.untrusted) >= self.max_untrusted:
                self._evict(next(iter(self.untrusted)))
            self._stream(self._reactor, sock, self._factory(), self)

    def _evict(self, stream: Stream) -> None:
        del self.untrusted[stream]
        stream.abort()
        self._evicted += 1
        now = time.monotonic()
        if now - self._reported >= REPORT_EVERY:
            log.warning(
                "closed %d connection(s) that had not finished their handshake: over the "
                "cap of %d at once (oldest first)",
                self._evicted,
                self.max_untrusted,
            )
            self._evicted, self._reported = 0, now

    def _resume(self) -> None:
        if self.socket.fileno() != -1:
            self._reactor.register(self.socket, READ, self._accept)

    def close(self) -> None:
        self._reactor.unregister(self.socket)
        self.socket.close()


class Stream:
    """One connection: reads into its protocol's buffer, writes with flow control."""

    _WOULD_BLOCK: tuple[type[Exception], ...] = (BlockingIOError, InterruptedError)

    def __init__(
        self,
        reactor: Reactor,
        sock: socket.socket,
        protocol: StreamProtocol,
        server: Server | None = None,
    ) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reactor = reactor
        self._sock = sock
        self._send: Callable[[bytes | memoryview], int] = sock.send
        self._protocol = protocol
        self._pending: collections.deque[memoryview] = collections.deque()
        self._size = 0
        self._high = 64 << 10
        self._low = 16 << 10
        self._paused = False
        self._closing = False
        self._closed = False
        try:
            self._peer: Any = sock.getpeername()
        except OSError:
            self._peer = None
        self._server = server
        if server is not None:
            server.untrusted[self] = None
        reactor.register(sock, READ, self._ready)
        try:
            protocol.connection_made(self)
        except Exception:
            log.exception("closed a new connection: setting it up failed")
            self.abort()

    def get_extra_info(self, name: str) -> Any:
        if name == "socket":
            return self._sock
        return self._peer if name == "peername" else None

    def set_write_buffer_limits(self, high: int) -> None:
        self._high, self._low = high, high // 4

    def get_write_buffer_size(self) -> int:
        return self._size

    def trust(self) -> None:
        """The protocol vouches for its peer: the stream is off probation (see Server)."""
        self._off_probation()

    def _off_probation(self) -> None:
        if self._server is not None:
            self._server.untrusted.pop(self, None)
            self._server = None

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """:meth:`Reactor.call_later` of the stream's loop."""
        return self._reactor.call_later(delay, callback)

    def is_closing(self) -> bool:
        return self._closing

    # -- reading ---------------------------------------------------------------------------

    def _ready(self, mask: int) -> None:
        if mask & READ and not self._closing:
            self._read()
        if mask & WRITE and not self._closed:
            self._drain()

    def _read(self) -> None:
        try:
            size = self._sock.recv_into(self._protocol.get_buffer(-1))
            if size:
                self._protocol.buffer_updated(size)
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lose(exc)
            return
        except Exception:
            log.exception("closed a connection: handling what it sent failed")
            self.abort()
            return
        try:
            self._protocol.eof_received()
        except Exception:
            log.exception("a connection's end of file was not handled cleanly")
        finally:
            self.close()

    # -- writing ---------------------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._pending:
            try:
                sent = self._send(data)
            except self._WOULD_BLOCK:
                sent = 0
            except OSError as exc:  # told later, as asyncio does: the writer is mid-work
                self._closing = True
                self._reactor.call_soon(self._lose, exc)
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
            self._reactor.modify(self._sock, READ | WRITE, self._ready)
        view = memoryview(data)  # callers never change a buffer once they have written it
        self._pending.append(view)
        self._size += len(view)
        if not self._paused and self._size > self._high:
            self._paused = True
            self._protocol.pause_writing()

    def _drain(self) -> None:
        pending = self._pending
        while pending:
            try:
                sent = self._send(pending[0])
            except self._WOULD_BLOCK:
                break
            except OSError as exc:
                self._lose(exc)
                return
            self._size -= sent
            if sent < len(pending[0]):
                pending[0] = pending[0][sent:]
                break
            pending.popleft()
        if not pending:
            if self._closing:
                self._lose(None)
                return
            self._reactor.modify(self._sock, READ, self._ready)
        if self._paused and self._size <= self._low:
            self._paused = False
            self._protocol.resume_writing()

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close once what is queued has been sent (reading no more meanwhile)."""
        if self._closing:
            return
        self._closing = True
        if self._pending:
            self._reactor.modify(self._sock, WRITE, self._ready)
        else:
            self._reactor.call_soon(self._lose, None)

    def abort(self) -> None:
        """Close now, dropping what is queued."""
        self._closing = True
        self._pending.clear()
        self._size = 0
        self._reactor.call_soon(self._lose, None)

    def _lose(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = self._closing = True
        self._off_probation()
        self._reactor.unregister(self._sock)
        self._sock.close()
        self._pending.clear()
        self._size = 0
        try:
            self._protocol.connection_lost(exc)
        except Exception:
            log.exception("a connection's loss was not handled cleanly")
