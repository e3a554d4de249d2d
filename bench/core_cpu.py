"""The loader's CPU per miss on its request path, in one process, without the network.

A miss is two requests (Fetch, then Commit) that a loader's connection decodes, handles and
answers. This script feeds them straight into a ``ServerConnection`` (on a stand-in
transport that keeps what it is given) from a client ``Connection`` in the same process, so
that what it times is the loader's Python, the store's commit and the client's framing: no
system call of the network, no other process, nothing a busy machine's scheduler adds, on
the loader's kind of loop (uvloop where it is installed). Two source trees run in turns,
each in a process of its own, like bench/ab.py:

    .venv/bin/python bench/core_cpu.py /tmp/before .              # :memory:, 5 rounds each
    .venv/bin/python bench/core_cpu.py /tmp/before . --durable    # the default durable store
    .venv/bin/python bench/core_cpu.py . . --quick                # the tests' check

Each round prints CPU microseconds per miss; the last line is the ratio of the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import asyncio, gc, sys, tempfile, time
from clustorage import codec, messages
from clustorage.hello import Timing, handshake_meta
from clustorage.loader import LoaderCore
from clustorage.messages import VALUE, Commit, Fetch
from clustorage.protocol import Connection, Role
from clustorage.server import ServerConnection
from clustorage.store import open_store
from clustorage.writer import StoreWriter

COOKIE = b"c" * 32


class Transport:
    def __init__(self):
        self.out = []

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def write(self, data):
        self.out.append(bytes(data))

    def is_closing(self):
        return False

    def get_write_buffer_size(self):
        return 0

    def close(self):
        pass


async def main(data, count, rounds):
    loop = asyncio.get_running_loop()
    store = open_store(data)
    writer = None
    if data != ":memory:":  # small writes gathered per pass of the loop, as the runtime does
        try:
            writer = StoreWriter(store, loop.call_soon_threadsafe, soon=loop.call_soon)
        except TypeError:  # a tree from before they were
            writer = StoreWriter(store, loop.call_soon_threadsafe)
    core = LoaderCore("L", store, loop.call_later, writes=writer, soon=loop.call_soon)
    server = ServerConnection(core, COOKIE, Timing(), 1 << 30, set())
    transport = Transport()
    server.connection_made(transport)
    client = Connection(Role.CLIENT, COOKIE, handshake_meta("m"))

    def to_server(data):
        space = server.get_buffer(len(data))
        space[: len(data)] = data
        server.buffer_updated(len(data))

    def answers():
        got = []
        for chunk in transport.out:
            if client.state.value == "open":
                got += [messages.decode(payload) for payload in client.read_frames(chunk)]
            else:
                client.receive_data(chunk)
                while client.next_event() is not None:
                    pass
        transport.out.clear()
        return {getattr(message, "rid", 0): message for message in got}

    answers()
    to_server(client.data_to_send())
    answers()
    await asyncio.sleep(0.01)
    answers()
    payload = codec.dump_borrowing("k", 5)

    async def answer(rid):
        got = answers()
        while rid not in got:  # the loop's next pass (the store writer's, the fan-out's)
            await asyncio.sleep(0)
            got = answers()
        return got[rid]

    async def miss(i):
        key = f"k{i}"
        to_server(client.send(messages.encode(Fetch(2 * i + 1, VALUE, key, True, ()))))
        token = (await answer(2 * i + 1)).token
        to_server(client.send(messages.encode(Commit(2 * i + 2, key, token, payload))))
        assert type(await answer(2 * i + 2)) is messages.Committed

    for i in range(min(count, 500)):
        await miss(-i - 1)
    for number in range(rounds):
        gc.collect()
        start = time.process_time()
        for i in range(number * count, (number + 1) * count):
            await miss(i)
            if i % 64 == 0:
                await asyncio.sleep(0)  # the fan-out's passes
        print((time.process_time() - start) / count * 1e6, flush=True)
    if writer is not None:
        writer.close()
    store.close()


from clustorage.aioloop import new_loop  # the loader's own kind of loop (uvloop)

with tempfile.TemporaryDirectory() as temp:
    data = f"{temp}/store" if sys.argv[1] == "durable" else ":memory:"
    loop = new_loop()
    try:
        loop.run_until_complete(main(data, int(sys.argv[2]), int(sys.argv[3])))
    finally:
        loop.close()
"""


def batch(tree: Path, durable: bool, count: int) -> float:
    """CPU microseconds per miss in a fresh process on ``tree``'s code: the median of
    three runs of ``count`` misses."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    store = "durable" if durable else "memory"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, store, str(count), "3"],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {done.stderr[-2000:]}")
    return statistics.median(map(float, done.stdout.split()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("trees", nargs=2, type=Path, metavar="TREE", help="two source trees")
    parser.add_argument("--durable", action="store_true", help="the default durable store")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per tree (5)")
    parser.add_argument("--quick", action="store_true", help="tiny rounds, for the tests")
    args = parser.parse_args(argv)
    rounds, count = (1, 100) if args.quick else (args.rounds, 4000)
    trees = [path.resolve() for path in args.trees]
    figures: list[list[float]] = [[], []]
    for number in range(rounds):
        for index in (0, 1) if number % 2 == 0 else (1, 0):
            figures[index].append(batch(trees[index], args.durable, count))
            print(f"{'AB'[index]} {figures[index][-1]:.1f} us CPU per miss", flush=True)
    medians = [statistics.median(figure) for figure in figures]
    for name, tree, median in zip("AB", trees, medians, strict=True):
        print(f"{name} {tree}: {median:.1f} us CPU per miss")
    print(f"B/A {medians[1] / medians[0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
