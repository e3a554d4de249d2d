"""The loader's loop on asyncio or uvloop, behind the interface of :class:`~.reactor.Reactor`.

For measuring the hand-written reactor against a well-kept event loop (``bench/loops.py``),
chosen with ``$CLUSTORAGE_LOOP`` (``reactor``, the default; ``asyncio``; ``uvloop``). The
same :class:`~.server.ServerConnection` runs on either: it is an asyncio buffered protocol
in all but name. What this loop does not do is cap unauthenticated connections (the
reactor's :class:`~.reactor.Server` does), nor tell a member without TLS why it is refused
(:mod:`~.tls` does): it is for measuring, not for hostile networks.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
from collections.abc import Callable
from typing import Any

from .reactor import Reactor, StreamProtocol

__all__ = ["AsyncioLoop", "make_loop"]


class _Transport:
    """An asyncio transport with what a ServerConnection asks of a reactor Stream."""

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self.write = transport.write
        self.get_write_buffer_size = transport.get_write_buffer_size
        self.is_closing = transport.is_closing
        self.close = transport.close
        self.abort = transport.abort

    def get_extra_info(self, name: str) -> Any:
        if name == "channel_binding":  # see tls.channel_binding
            tls = self._transport.get_extra_info("ssl_object")
            return None if tls is None else tls.get_channel_binding("tls-unique")
        return self._transport.get_extra_info(name)

    def set_write_buffer_limits(self, high: int) -> None:
        self._transport.set_write_buffer_limits(high=high)

    def trust(self) -> None:
        """Nothing to do: this loop keeps no probation (see the module docstring)."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return self._loop.call_later(delay, callback)


class _Protocol(asyncio.BufferedProtocol):
    """Hands asyncio's callbacks to a reactor stream protocol."""

    def __init__(self, inner: StreamProtocol, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = inner
        self._loop = loop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(_Transport(transport, self._loop))  # type: ignore[arg-type]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._inner.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._inner.buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _Server:
    def __init__(self, server: asyncio.Server) -> None:
        self._server = server
        self.socket = server.sockets[0]

    def close(self) -> None:
        self._server.close()


class AsyncioLoop:
    """An asyncio (or uvloop) event loop with the Reactor's methods."""

    def __init__(self, kind: str = "asyncio") -> None:
        if kind == "uvloop":
            import uvloop

            self._loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        else:
            self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        if threading.current_thread() is self._thread:
            self._loop.call_soon(callback, *args)
        else:
            self._loop.call_soon_threadsafe(callback, *args)

    call_soon_threadsafe = call_soon

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return self._loop.call_later(delay, callback)

    def run_forever(self) -> None:
        self._thread = threading.current_thread()
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)

    def close(self) -> None:
        if not self._loop.is_running():
            self._loop.close()

    def is_running(self) -> bool:
        return self._loop.is_running()

    def is_closed(self) -> bool:
        return self._loop.is_closed()

    def listen(
        self,
        host: str,
        port: int,
        factory: Callable[[], StreamProtocol],
        tls: ssl.SSLContext | None = None,
    ) -> _Server:
        """Listen on ``host:port`` (before the loop runs, as the runtime does), with the loop's
        own TLS under ``tls``."""
        loop = self._loop
        server = loop.run_until_complete(
            loop.create_server(
                lambda: _Protocol(factory(), loop), host, port, backlog=1024, ssl=tls
            )
        )
        return _Server(server)


def make_loop() -> Reactor | AsyncioLoop:
    """The loop ``$CLUSTORAGE_LOOP`` names: the reactor unless ``asyncio`` or ``uvloop``."""
    kind = os.environ.get("CLUSTORAGE_LOOP", "reactor")
    return Reactor() if kind == "reactor" else AsyncioLoop(kind)
