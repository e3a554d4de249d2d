"""A big value over a link slower than the node's timeout: its get waits while the bytes
keep coming (the timeout is for a loader that says nothing, not for a long answer)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import Cluster, Member

pytestmark = pytest.mark.timeout(120)

SIZE = 12_000_000
RATE = 4_000_000  # bytes/s from the loader to the node: 3 s for the value
TIMEOUT = 1.0


class SlowLink:
    """A TCP proxy on 127.0.0.1 to ``port`` that passes what the far end sends at ``rate``
    bytes/s."""

    def __init__(self, port: int, rate: int) -> None:
        self.target = ("127.0.0.1", port)
        self.rate = rate
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = [self.server]
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.server.accept()
                far = socket.create_connection(self.target)
            except OSError:
                return
            self.sockets += [near, far]
            for source, sink, rate in ((near, far, None), (far, near, self.rate)):
                thread = threading.Thread(target=self._pipe, args=(source, sink, rate))
                thread.daemon = True
                thread.start()
                self.threads.append(thread)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, rate: int | None) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536 if rate is None else rate // 50):
                sink.sendall(data)
                if rate is not None:
                    time.sleep(len(data) / rate)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self.threads:
            thread.join(10)


@pytest.fixture
def reader(cluster: Cluster) -> Iterator[Member]:
    """A member process whose node ``slow`` reaches the loader through a SlowLink, once a
    writer has put a big value (``big``) and ``slow`` has heard of it."""
    cluster.start_loader()
    writer = cluster.member("writer")
    assert writer.ok(f"node.put('big', bytes(range(256)) * ({SIZE} // 256))") == 1
    link = SlowLink(cluster.port, RATE)
    try:
        member = cluster.member("reader")
        member.ok(
            "import clustorage, time\n"
            f"slow = clustorage.Node('slow', 'app1@127.0.0.1:{link.port}', timeout={TIMEOUT})\n"
            "deadline = time.monotonic() + 30\n"
            "while 'big' not in slow.keys() and time.monotonic() < deadline: time.sleep(0.05)"
        )
        yield member
    finally:
        link.close()


def test_a_big_value_slower_than_the_timeout_arrives(reader: Member) -> None:
    took = reader.ok(
        "start = time.monotonic()\n"
        "value = slow.get('big')\n"
        f"assert value == bytes(range(256)) * ({SIZE} // 256)\n"
        "time.monotonic() - start"
    )
    assert took > TIMEOUT  # the case at hand: it took longer than the timeout
    assert reader.ok("slow.connected and slow.get('big') is value")  # kept, not fetched again


def test_a_request_behind_a_slow_big_value_is_answered(reader: Member) -> None:
    """A put on another thread of the node, answered after the big value's bytes, which
    take longer than the timeout to arrive: both succeed."""
    assert reader.ok(
        "import threading\n"
        "got = []\n"
        "getting = threading.Thread(target=lambda: got.append(slow.get('big')))\n"
        "getting.start()\n"
        "time.sleep(0.3)\n"
        "slow.put('other', 1)\n"
        "getting.join(60)\n"
        f"len(got[0]) == {SIZE} and slow.get('other') == 1"
    )


def test_threads_getting_one_big_value_fetch_it_once(reader: Member) -> None:
    """Four threads of one node get a big value at once: its bytes come once, and every
    thread gets that one value."""
    assert reader.ok(
        "import concurrent.futures, socket, struct\n"
        "with concurrent.futures.ThreadPoolExecutor(4) as pool:\n"
        "    got = list(pool.map(lambda _: slow.get('big'), range(4)))\n"
        "info = slow._channel._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)\n"
        "received = struct.unpack_from('Q', info, 128)[0]\n"
        f"assert {SIZE} <= received < {SIZE} * 3 // 2, received\n"
        "all(value is got[0] for value in got)"
    )
