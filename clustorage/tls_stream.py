"""The loader's TLS connections: the handshake, then an asyncio transport in which OpenSSL
reads and writes the socket itself.

A loop's own TLS (``ssl=`` of asyncio or uvloop) moves every record through two memory
buffers, a Python call or two and an exception per read; here a record goes from the
socket into the protocol's buffer (a big payload's own, while one arrives) in one call, and
from the protocol's bytes to the socket in one. bench/README.md, "TLS", has the figures.
OpenSSL writes the alert of a failed handshake itself, so the member learns why.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import select
import socket
import ssl
from typing import Any

from .tls import ENDED, WAITING, read_records, tls_object

__all__ = ["TLSStream", "accept"]

log = logging.getLogger(__name__)

READ_BUDGET = 1 << 20  # bytes read in one turn of the loop before others get theirs
HIGH_WATER = 64 << 10
SWEEP = 0.25  # seconds between two looks at every stream's socket (see _Sweeper)


async def accept(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, context: ssl.SSLContext, timeout: float
) -> ssl.SSLSocket:
    """The server side of the TLS handshake on the accepted, non-blocking ``sock`` (which
    it takes over), within ``timeout`` seconds.

    Raises:
        ssl.SSLError: the handshake failed (its alert went to the peer).
        TimeoutError: it did not end in time.
        OSError: the connection failed meanwhile.
    """
    tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    fd = tls.fileno()
    done: asyncio.Future[None] = loop.create_future()
    writing = False

    def want_writable(wanted: bool) -> None:
        nonlocal writing
        if wanted != writing:
            writing = wanted
            if wanted:
                loop.add_writer(fd, step)
            else:
                loop.remove_writer(fd)

    def step() -> None:
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            want_writable(False)  # else a writable socket calls this on every turn
            return
        except ssl.SSLWantWriteError:
            want_writable(True)
            return
        except BaseException as exc:
            if not done.done():
                done.set_exception(exc)
            return
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, step)
    try:
        try:
            step()
            async with asyncio.timeout(timeout):  # unlike wait_for, never swallows a cancel
                await done
        finally:  # before the socket closes: its number may soon be another's
            loop.remove_reader(fd)
            if writing:
                loop.remove_writer(fd)
    except BaseException:
        tls.close()
        raise
    return tls


class TLSStream(asyncio.Transport):
    """A transport over ``sock``, an ``ssl.SSLSocket`` whose handshake is done, for a
    buffered ``protocol`` (its ``connection_made`` is called here).

    Writes go out at once, whole; what the socket cannot take waits, and the protocol is
    paused past the high-water mark. OpenSSL must be given the same bytes again after a
    write it could not finish, so a waiting write keeps them (a copy, unless ``bytes``).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: ssl.SSLSocket,
        protocol: asyncio.BufferedProtocol,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._tls: Any = tls_object(sock)
        self._protocol = protocol
        self._backlog: collections.deque[bytes] = collections.deque()
        self._backlog_size = 0
        self._high, self._low = HIGH_WATER, HIGH_WATER // 4
        self._protocol_paused = False
        self._closing = False
        self._lost = False
        try:
            peer = sock.getpeername()
        except OSError:
            peer = None
        self._extra = {"peername": peer, "socket": sock, "ssl_object": sock}
        self._waiting = select.poll()  # for _catch_up
        self._waiting.register(self._fd, select.POLLIN)
        try:
            protocol.connection_made(self)
        except Exception as exc:
            self._protocol_failed(exc)
        if not self._closing:
            loop.add_reader(self._fd, self._readable)
            _Sweeper.of(loop).add(self)

    # -- asyncio.Transport --------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        self._high, self._low = high, high // 4 if low is None else low
        self._control_protocol()

    def get_write_buffer_size(self) -> int:
        return self._backlog_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._backlog:
            try:
                self._tls.write(data)  # whole, or it raises
                return
            except ssl.SSLWantWriteError:
                self._loop.add_writer(self._fd, self._writable)
            except (ssl.SSLError, OSError) as exc:
                self._fail(exc)
                return
        chunk = data if type(data) is bytes else bytes(data)
        self._backlog.append(chunk)
        self._backlog_size += len(chunk)
        self._control_protocol()

    def close(self) -> None:
        """Stop reading, send what waits, then close (with a TLS close_notify)."""
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        if not self._backlog:
            self._loop.call_soon(self._end, None, True)

    def abort(self) -> None:
        self._closing = True
        self._end(None, False)

    # -- the loop's callbacks -------------------------------------------------------------

    def _readable(self) -> None:
        """Read records into the protocol's buffer, as many as have come, up to a budget;
        the protocol hears of them once per buffer, not once per record.

        A short record with nothing behind it in TLS ends the read (asking TLS once more
        would cost an exception), and the loop calls again when more comes; where it does
        not, :class:`_Sweeper` does. A spent budget yields to other connections and reads on
        soon after.
        """
        try:
            self._read_records()
        except Exception as exc:  # the protocol's, as a loop's transport treats them
            self._protocol_failed(exc)

    def _read_records(self) -> None:
        tls, protocol = self._tls, self._protocol
        budget = READ_BUDGET
        while not self._closing:
            buffer = memoryview(protocol.get_buffer(-1))
            filled, why, failed = read_records(tls, buffer, 0, min(len(buffer), budget))
            if filled:
                protocol.buffer_updated(filled)
            if failed is not None:
                self._fail(failed)
                return
            if why == ENDED:
                if not self._closing:
                    self._loop.remove_reader(self._fd)
                    self._stop_sweeping()  # the end polls readable: eof_received once only
                    if not protocol.eof_received():
                        self.close()
                return
            if why == WAITING:
                return
            budget -= filled
            if budget <= 0:
                if not self._closing:
                    self._loop.call_soon(self._readable)
                return

    def _writable(self) -> None:
        backlog = self._backlog
        while backlog:
            try:
                self._tls.write(backlog[0])
            except ssl.SSLWantWriteError:
                return
            except (ssl.SSLError, OSError) as exc:
                self._fail(exc)
                return
            self._backlog_size -= len(backlog.popleft())
            if not backlog:
                self._loop.remove_writer(self._fd)
            self._control_protocol()  # may write again (behind what is left)
            if self._lost:
                return
        if self._closing:
            self._end(None, True)

    def _catch_up(self) -> None:
        """Read what the socket holds (or the error it reports) if the loop did not."""
        if not self._closing and self._waiting.poll(0):
            self._readable()

    # -- the rest -------------------------------------------------------------------------

    def _control_protocol(self) -> None:
        size = self._backlog_size
        try:
            if not self._protocol_paused and size > self._high:
                self._protocol_paused = True
                self._protocol.pause_writing()
            elif self._protocol_paused and size <= self._low:
                self._protocol_paused = False
                self._protocol.resume_writing()
        except Exception as exc:
            self._protocol_failed(exc)

    def _protocol_failed(self, exc: Exception) -> None:
        log.error("closed %s: its protocol failed: %r", self._extra["peername"], exc, exc_info=exc)
        self._fail(exc)

    def _stop_sweeping(self) -> None:
        if (sweeper := _SWEEPERS.get(self._loop)) is not None:
            sweeper.discard(self)

    def _fail(self, exc: Exception) -> None:
        log.debug("TLS connection %s failed: %s", self._extra["peername"], exc)
        self._closing = True
        self._end(exc, False)

    def _end(self, exc: Exception | None, notify: bool) -> None:
        """Close the socket (after a close_notify if ``notify``); connection_lost soon."""
        if self._lost:
            return
        self._lost = True
        self._stop_sweeping()
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._backlog.clear()
        self._backlog_size = 0
        if notify:
            with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                self._tls.shutdown()  # sends close_notify; the peer's is not awaited
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)


class _Sweeper:
    """Every :data:`SWEEP` seconds, the streams of one loop whose socket holds what nobody
    read are read.

    A read trusts the loop to call again while the socket has more. uvloop (libuv) stops
    watching a socket that reports an error, though: requests that came just before a reset
    would wait unread for ever, and the stream would never end. A poll after every read
    would cost each request a system call; this costs one per stream every SWEEP seconds.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.streams: set[TLSStream] = set()
        self.timer: asyncio.TimerHandle | None = None

    @staticmethod
    def of(loop: asyncio.AbstractEventLoop) -> _Sweeper:
        sweeper = _SWEEPERS.get(loop)
        if sweeper is None:
            for closed in [other for other in _SWEEPERS if other.is_closed()]:
                del _SWEEPERS[closed]  # a loop that stopped with streams open: let it go
            sweeper = _SWEEPERS[loop] = _Sweeper(loop)
        return sweeper

    def add(self, stream: TLSStream) -> None:
        self.streams.add(stream)
        if self.timer is None:
            self.timer = self.loop.call_later(SWEEP, self._sweep)

    def discard(self, stream: TLSStream) -> None:
        self.streams.discard(stream)
        if not self.streams:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            _SWEEPERS.pop(self.loop, None)

    def _sweep(self) -> None:
        self.timer = None
        for stream in list(self.streams):
            stream._catch_up()
        if self.streams and self.timer is None:
            self.timer = self.loop.call_later(SWEEP, self._sweep)


_SWEEPERS: dict[asyncio.AbstractEventLoop, _Sweeper] = {}
