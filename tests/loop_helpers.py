"""A loader's event loop on a thread of its own, and an honest member's handshake with a
server on it over a real socket."""

from __future__ import annotations

import concurrent.futures
import socket
import threading
from collections.abc import Callable
from typing import Any

from clustorage.aioloop import new_loop
from clustorage.hello import handshake_meta
from clustorage.protocol import Connection, Role, State
from tests.protocol_helpers import COOKIE


class LoopThread:
    """An event loop of the loader's kind, running on a thread of its own."""

    def __init__(self) -> None:
        self.loop = new_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def on_loop(self, function: Callable[[], Any]) -> Any:
        """``function()`` run on the loop thread; its result."""
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.loop.call_soon_threadsafe(lambda: done.set_result(function()))
        return done.result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def honest_handshake(port: int, name: str) -> tuple[socket.socket, Connection]:
    """An honest member's handshake with the server on ``port``: its socket and its
    connection, in the state the handshake ended in (open, unless refused or cut short)."""
    client = Connection(Role.CLIENT, COOKIE, handshake_meta(name))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        while client.state not in (State.OPEN, State.ERROR, State.CLOSED):
            data = sock.recv(65536)
            if not data:
                break
            client.receive_data(data)
            client.next_event()
            sock.sendall(client.data_to_send())
    except BaseException:
        sock.close()
        raise
    return sock, client
