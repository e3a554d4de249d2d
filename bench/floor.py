"""The least an acknowledged put must do in Clustorage's design, as a bound for `writes.py`.

A model, not Clustorage: a writer sends an authenticated frame (blake2b MAC under the
cookie) to a server on a uvloop loop; the server commits every put of a loop pass in one
SQLite transaction (WAL, ``synchronous=NORMAL``, 4 KiB pages, as the store), answers each,
and every 5 ms pushes one frame with every change of that time to every connection, where
each writer installs each value into its replica (a dict) as it reads its answers. No
leases, no Ctrl-C safety, no reconnects, no backlog cap, no listeners.

``--history`` keeps each key's earlier versions as the store does (insert the new row, drop
the old one's payload); without it a key is one row, overwritten.

``python bench/floor.py --serve PORT --data DIR [--history]`` serves on 127.0.0.1:PORT,
prints one JSON line once it listens, and exits when stdin says ``{"op": "exit"}`` or ends;
:class:`Writer` is the writer's end.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import marshal
import os
import pickle
import socket
import sqlite3
import struct
import sys
import threading
import time
from typing import Any

HEADER = struct.Struct("!I")
MAC_SIZE = 16
PUSH_EVERY = 0.005  # seconds, as clustorage.fanout.PACE


def _key() -> bytes:
    return hashlib.blake2b(os.environ["CLUSTORAGE_COOKIE"].encode(), digest_size=32).digest()


def _frame(key: bytes, body: bytes) -> bytes:
    mac = hashlib.blake2b(body, key=key, digest_size=MAC_SIZE).digest()
    return HEADER.pack(len(body)) + mac + body


def _frames(key: bytes, buffer: bytearray) -> list[bytes]:
    """The whole frames at the start of ``buffer``, taken out of it, each checked."""
    bodies = []
    start = HEADER.size + MAC_SIZE
    while len(buffer) >= start:
        (length,) = HEADER.unpack_from(buffer)
        if len(buffer) < start + length:
            break
        mac, body = bytes(buffer[HEADER.size : start]), bytes(buffer[start : start + length])
        del buffer[: start + length]
        expected = hashlib.blake2b(body, key=key, digest_size=MAC_SIZE).digest()
        if not hmac.compare_digest(mac, expected):
            raise ValueError("a frame failed its MAC")
        bodies.append(body)
    return bodies


class _Server:
    def __init__(self, data: str, history: bool) -> None:
        self.key = _key()
        self.db = sqlite3.connect(os.path.join(data, "floor.db"), isolation_level=None)
        for pragma in ("page_size=4096", "locking_mode=EXCLUSIVE", "journal_mode=WAL"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("PRAGMA synchronous=NORMAL")
        primary = "kind, key, version" if history else "kind, key"
        self.db.execute(
            "CREATE TABLE entries (kind TEXT, key TEXT, version INTEGER, payload BLOB, "
            f"origin TEXT, time REAL, PRIMARY KEY ({primary})) WITHOUT ROWID"
        )
        self.history = history
        self.connections: list[_Connection] = []
        self.versions: dict[str, int] = {}
        self.version = 0
        self.pending: list[tuple[_Connection, int, str, bytes, int, int]] = []
        self.changes: dict[str, tuple[str, int, bytes]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pushing = False

    def put(self, connection: _Connection, rid: int, key: str, payload: bytes) -> None:
        previous = self.versions.get(key, 0)
        self.version += 1
        self.versions[key] = self.version
        if not self.pending:
            assert self.loop is not None
            self.loop.call_soon(self.commit)
        self.pending.append((connection, rid, key, payload, self.version, previous))

    def commit(self) -> None:
        batch, self.pending = self.pending, []
        now = time.time()
        execute = self.db.execute
        execute("BEGIN IMMEDIATE")
        for _, _, key, payload, version, previous in batch:
            if self.history:
                row = ("value", key, version, payload, "w", now)
                execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)", row)
                if previous:
                    where = ("value", key, previous)
                    execute(
                        "UPDATE entries SET payload = NULL "
                        "WHERE kind = ? AND key = ? AND version = ?",
                        where,
                    )
            else:
                row = ("value", key, version, payload, "w", now)
                execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?)", row)
        execute("COMMIT")
        for connection, rid, key, payload, version, _ in batch:
            connection.send(marshal.dumps((rid, version)))
            self.changes[key] = (key, version, payload)
        if not self.pushing:
            self.pushing = True
            assert self.loop is not None
            self.loop.call_later(PUSH_EVERY, self.push)

    def push(self) -> None:
        self.pushing = False
        changes, self.changes = tuple(self.changes.values()), {}
        frame = _frame(self.key, marshal.dumps((0, changes)))
        for connection in self.connections:
            connection.transport.write(frame)


class _Connection(asyncio.Protocol):
    def __init__(self, server: _Server) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.append(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.server.connections.remove(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            bodies = _frames(self.server.key, self.buffer)
        except ValueError:
            self.transport.close()
            return
        for body in bodies:
            rid, key, payload = marshal.loads(body)
            self.server.put(self, rid, key, payload)

    def send(self, body: bytes) -> None:
        self.transport.write(_frame(self.server.key, body))


def serve(port: int, data: str, history: bool) -> None:
    """Serve until told to exit on stdin (as bench/worker.py is), or stdin closes."""
    import uvloop

    server = _Server(data, history)
    threading.Thread(target=_exit_when_told, daemon=True).start()

    async def main() -> None:
        server.loop = asyncio.get_running_loop()
        listener = await server.loop.create_server(lambda: _Connection(server), "127.0.0.1", port)
        print(json.dumps({"ok": {"ready": port}}), flush=True)
        async with listener:
            await listener.serve_forever()

    uvloop.run(main())


def _exit_when_told() -> None:
    for line in sys.stdin:
        if json.loads(line).get("op") == "exit":
            break
    os._exit(0)


class Writer:
    """A writer's connection: each ``put`` returns once the server committed it."""

    def __init__(self, port: int) -> None:
        self.key = _key()
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.replica: dict[str, tuple[int, Any]] = {}
        self.rid = 0

    def put(self, key: str, value: Any) -> int:
        self.rid += 1
        payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        self.sock.sendall(_frame(self.key, marshal.dumps((self.rid, key, payload))))
        replica = self.replica
        while True:
            for body in _frames(self.key, self.buffer):
                rid, answer = marshal.loads(body)
                if rid == 0:  # pushes: install what is newer
                    for pushed, version, pickled in answer:
                        if replica.get(pushed, (0,))[0] < version:
                            replica[pushed] = (version, pickle.loads(pickled))
                elif rid == self.rid:
                    if replica.get(key, (0,))[0] < answer:
                        replica[key] = (answer, value)
                    return int(answer)
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the floor server closed the connection")
            self.buffer += data

    def close(self) -> None:
        self.sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", type=int, required=True, metavar="PORT")
    parser.add_argument("--data", required=True, metavar="DIR")
    parser.add_argument("--history", action="store_true")
    arguments = parser.parse_args()
    serve(arguments.serve, arguments.data, arguments.history)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
