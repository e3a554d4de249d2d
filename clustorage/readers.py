"""One thread per process that reads the pushes of every member connection in it.

A member connection's pushes (hot-loads, deletions, membership) arrive while nobody in its
process waits for an answer. One thread per connection would read them; with many nodes in
one process (a hundred ``Node`` objects, each its own connection) every push then wakes a
hundred threads, which queue for the GIL one after another, and the kernel's cost of waking
each of them lands on the loader's send. Here one thread polls every connection of the
process instead: a push to all of them wakes it once, and it reads each connection that has
data in turn.

A connection whose own caller is reading its answer is left to that caller: it is parked,
not polled, for a moment (``readable`` says how long), or the poll would report it over and
over; a caller done after a long wait resumes it (:meth:`SharedReader.resume`). A parked
connection has one retry at a time: parking it again replaces the one before, and a resume
drops it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Protocol

from .bulk import RECYCLED

__all__ = ["SharedReader", "Watched", "shared_reader"]

log = logging.getLogger(__name__)

READ = select.POLLIN | select.POLLPRI
TICK = 0.5  # seconds between two calls of every connection's ``due``


class Watched(Protocol):
    """A connection the shared reader reads for."""

    def readable(self, retry: bool) -> float | None:
        """Read what arrived, without blocking; or seconds to wait before calling again
        (with ``retry`` set) when someone else is about to read it. Raising ends the watch:
        the exception goes to :meth:`ended`."""

    def ended(self, error: BaseException) -> None:
        """The connection failed (``readable`` raised ``error``): it is watched no more."""

    def due(self, now: float) -> bool:
        """Called every TICK seconds: whether to call ``readable`` now (a heartbeat is due)."""


class SharedReader:
    """The poll loop of one thread, for every :class:`Watched` connection of the process."""

    def __init__(self) -> None:
        epoll = getattr(select, "epoll", None)
        self._poller: Any = select.poll() if epoll is None else epoll()
        self._poll_unit = 1000.0 if epoll is None else 1.0  # poll takes ms, epoll seconds
        self._lock = threading.Lock()
        self._watched: dict[int, tuple[socket.socket, Watched]] = {}
        self._later: list[tuple[float, int, int, Watched]] = []  # when, order, fd, watched
        self._parked: set[int] = set()  # sockets not polled until their retry or resume
        self._order = itertools.count()
        self._retries: dict[int, int] = {}  # fd -> the order of its one live retry
        self._resumed: dict[int, int] = {}  # fd -> the order of its last resume
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._poller.register(self._wake_read.fileno(), READ)
        self._running = True
        self._thread = threading.Thread(target=self._run, name="clustorage-reader", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """End the thread (the process's own reader runs as long as the process)."""
        self._running = False
        self._wake()
        self._thread.join()
        self._wake_read.close()
        self._wake_write.close()

    def watch(self, sock: socket.socket, watched: Watched) -> int:
        """Read ``sock`` for ``watched`` from now on, until it fails or :meth:`forget`;
        returns the socket's number, to forget it by once it is closed."""
        fd = sock.fileno()
        with self._lock:
            self._watched[fd] = (sock, watched)
            self._parked.discard(fd)  # a closed socket's number, parked
            self._forget_retry(fd)  # ... and its retry and last resume
            try:
                self._poller.register(fd, READ)
            except FileExistsError:  # a closed socket's number, still registered
                self._poller.modify(fd, READ)
        self._wake()
        return fd

    def forget(self, fd: int, watched: Watched) -> None:
        """Stop reading socket number ``fd`` for ``watched``."""
        with self._lock:
            self._unwatch(fd, watched)

    def resume(self, fd: int, watched: Watched) -> None:
        """Poll socket number ``fd`` for ``watched`` again at once, if it was parked (its
        caller, who read it meanwhile, is done), or as soon as a read of it that was told
        to come back later is over (it does not park it then)."""
        with self._lock:  # else it may land between _read's stamp check and its _park
            if not self._mine(fd, watched):
                return
            self._resumed[fd] = next(self._order)
            if self._unpark(fd):
                self._wake()

    def _unwatch(self, fd: int, watched: Watched) -> None:
        """(The lock held.) Forget ``fd`` if it is still ``watched``'s: its number may
        already belong to a newer connection."""
        if not self._mine(fd, watched):
            return
        del self._watched[fd]
        self._forget_retry(fd)
        if fd in self._parked:
            self._parked.discard(fd)
        else:
            with contextlib.suppress(OSError, ValueError):
                self._poller.unregister(fd)

    def _forget_retry(self, fd: int) -> None:
        """(The lock held.) Drop ``fd``'s retry and last resume: its connection is gone."""
        self._retries.pop(fd, None)
        self._resumed.pop(fd, None)

    def _park(self, fd: int) -> None:
        """(The lock held.) Poll ``fd`` no more (not even for a hang-up) until unparked."""
        if fd not in self._parked:
            with contextlib.suppress(OSError, ValueError):
                self._poller.unregister(fd)
        self._parked.add(fd)

    def _unpark(self, fd: int) -> bool:
        """(The lock held.) Poll ``fd`` again; whether it was parked."""
        if fd not in self._parked:
            return False
        self._parked.discard(fd)
        self._retries.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._poller.register(fd, READ)
        return True

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_write.send(b"\0")

    def _run(self) -> None:
        next_tick = time.monotonic() + TICK
        while self._running:
            try:
                next_tick = self._turn(next_tick)
            except Exception:  # every node of the process depends on this thread
                log.exception("the shared reader's loop failed; it goes on")
                time.sleep(0.01)

    def _turn(self, next_tick: float) -> float:
        """One poll and what it reports, retries and ticks; the next tick's time."""
        wake = self._wake_read.fileno()
        now = time.monotonic()
        wait = next_tick - now
        if self._later:
            wait = min(wait, self._later[0][0] - now)
        try:
            events = self._poller.poll(max(wait, 0.0) * self._poll_unit)
        except InterruptedError:
            return next_tick
        for fd, _ in events:
            if fd == wake:
                with contextlib.suppress(BlockingIOError, OSError):
                    while self._wake_read.recv(4096):
                        pass
                continue
            current = self._watched.get(fd)
            if current is not None:
                self._read(fd, current[1], retry=False)
        now = time.monotonic()
        while self._later and self._later[0][0] <= now:
            _, order, fd, watched = heapq.heappop(self._later)
            with self._lock:  # a resume, on a caller's thread, may drop it meanwhile
                live = self._retries.get(fd) == order
                if live:
                    del self._retries[fd]
            if live:  # else superseded, or resumed since
                self._read(fd, watched, retry=True)
        if now >= next_tick:
            next_tick = now + TICK
            RECYCLED.sweep(now)
            with self._lock:
                everyone = [(fd, watched) for fd, (_, watched) in self._watched.items()]
            for fd, watched in everyone:
                if watched.due(now):
                    self._read(fd, watched, retry=True)
        return next_tick

    def _read(self, fd: int, watched: Watched, *, retry: bool) -> None:
        resumed = self._resumed.get(fd)
        try:
            delay = watched.readable(retry)
        except BaseException as exc:  # a listener's SystemExit too: that connection ends
            with self._lock:
                self._unwatch(fd, watched)
            try:
                watched.ended(exc)
            except Exception:
                log.exception("the shared reader failed on %r", watched)
            return
        if delay is not None:  # parked meanwhile, or the poll would report it again
            with self._lock:
                if not self._mine(fd, watched):
                    return
                if self._resumed.get(fd) != resumed:  # its caller was done meanwhile
                    self._unpark(fd)
                    return
                self._park(fd)
                order = self._retries[fd] = next(self._order)
            heapq.heappush(self._later, (time.monotonic() + delay, order, fd, watched))
        elif fd in self._parked:
            with self._lock:
                if self._mine(fd, watched):
                    self._unpark(fd)

    def _mine(self, fd: int, watched: Watched) -> bool:
        current = self._watched.get(fd)
        return current is not None and current[1] is watched


_reader: SharedReader | None = None
_reader_pid = 0
_reader_lock = threading.Lock()


def _forked() -> None:
    """In a forked child: the parent's reader thread is not there, nor maybe its lock."""
    global _reader, _reader_lock
    _reader, _reader_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forked)


def shared_reader() -> SharedReader:
    """The process's shared reader, started on first use (again in a forked child)."""
    global _reader, _reader_pid
    with _reader_lock:
        if _reader is None or _reader_pid != os.getpid():
            _reader, _reader_pid = SharedReader(), os.getpid()
        return _reader
