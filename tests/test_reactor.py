"""The loader's event loop on its own: timers, calls from other threads, streams over real
local sockets (flow control, graceful close, abort, end of file)."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clustorage.reactor import Reactor, Stream

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    loop = Reactor()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.stop()
        thread.join(5)
        loop.close()


def on_loop(reactor: Reactor, function: Callable[[], Any]) -> Any:
    """Run ``function()`` on the loop thread and return its result."""
    done = threading.Event()
    result: list[Any] = []
    reactor.call_soon_threadsafe(lambda: (result.append(function()), done.set()))
    assert done.wait(5)
    return result[0]


class Recorder:
    """A stream protocol that records what happens to it."""

    def __init__(self) -> None:
        self.stream: Stream | None = None
        self.buffer = bytearray(1 << 16)
        self.received = bytearray()
        self.events: list[str] = []
        self.lost = threading.Event()

    def connection_made(self, stream: Stream) -> None:
        self.stream = stream

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.received += self.buffer[:nbytes]

    def eof_received(self) -> None:
        self.events.append("eof")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.set()

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")


def stream_pair(reactor: Reactor) -> tuple[Recorder, socket.socket]:
    """A Stream on the loop (with its Recorder) and the plain socket at its other end."""
    ours, theirs = socket.socketpair()
    recorder = Recorder()
    on_loop(reactor, lambda: Stream(reactor, ours, recorder))
    theirs.settimeout(5)
    return recorder, theirs


def test_timers_run_in_order_and_cancelled_ones_do_not(reactor: Reactor) -> None:
    """call_later runs callbacks by due time; a cancelled timer never runs."""
    ran: list[str] = []
    done = threading.Event()

    def schedule() -> None:
        reactor.call_later(0.05, lambda: ran.append("late"))
        reactor.call_later(0.01, lambda: ran.append("early"))
        reactor.call_later(0.02, lambda: ran.append("cancelled")).cancel()
        reactor.call_later(0.1, done.set)

    reactor.call_soon_threadsafe(schedule)
    assert done.wait(5)
    assert ran == ["early", "late"]


def test_calls_from_many_threads_all_run_on_the_loop_thread(reactor: Reactor) -> None:
    """call_soon_threadsafe from several threads: every call runs, on the loop's thread."""
    threads: set[str] = set()
    count = 0
    lock = threading.Lock()

    def call() -> None:
        nonlocal count
        threads.add(threading.current_thread().name)
        with lock:
            count += 1

    workers = [
        threading.Thread(target=lambda: [reactor.call_soon_threadsafe(call) for _ in range(500)])
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    on_loop(reactor, lambda: None)
    assert count == 2000
    assert len(threads) == 1


def test_a_failing_callback_does_not_stop_the_loop(reactor: Reactor) -> None:
    """An exception in a callback is logged; the next callback still runs."""
    reactor.call_soon_threadsafe(lambda: 1 / 0)
    assert on_loop(reactor, lambda: "still running") == "still running"


def test_stream_reads_writes_and_sees_end_of_file(reactor: Reactor) -> None:
    """Bytes flow both ways; the peer closing gives eof_received, then connection_lost."""
    recorder, peer = stream_pair(reactor)
    peer.sendall(b"hello")
    deadline = time.monotonic() + 5
    while recorder.received != b"hello" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert recorder.received == b"hello"
    assert recorder.stream is not None
    on_loop(reactor, lambda: recorder.stream.write(b"world"))  # type: ignore[union-attr]
    assert peer.recv(5) == b"world"
    peer.close()
    assert recorder.lost.wait(5)
    assert recorder.events == ["eof", "lost"]


def test_flow_control_pauses_above_high_and_resumes_below_low(reactor: Reactor) -> None:
    """A peer that does not read: writes queue, pause_writing fires once past the high
    watermark; once the peer drains, resume_writing fires and everything arrives in order."""
    recorder, peer = stream_pair(reactor)
    stream = recorder.stream
    assert stream is not None
    chunk = bytes(range(256)) * 1024
    on_loop(reactor, lambda: stream.set_write_buffer_limits(high=256 << 10))
    on_loop(reactor, lambda: [stream.write(chunk) for _ in range(32)])
    assert "pause" in recorder.events
    assert on_loop(reactor, stream.get_write_buffer_size) > 256 << 10
    received = bytearray()
    while len(received) < 32 * len(chunk):
        received += peer.recv(1 << 20)
    assert received == chunk * 32
    deadline = time.monotonic() + 5
    while "resume" not in recorder.events and time.monotonic() < deadline:
        time.sleep(0.01)
    assert recorder.events == ["pause", "resume"]
    assert on_loop(reactor, stream.get_write_buffer_size) == 0


def test_close_sends_what_is_queued_and_abort_does_not(reactor: Reactor) -> None:
    """close() flushes the queue before closing; abort() drops it."""
    big = b"q" * (4 << 20)
    closing, closing_peer = stream_pair(reactor)
    on_loop(reactor, lambda: (closing.stream.write(big), closing.stream.close()))  # type: ignore[union-attr]
    received = bytearray()
    while data := closing_peer.recv(1 << 20):
        received += data
    assert received == big
    assert closing.lost.wait(5)

    aborting, aborting_peer = stream_pair(reactor)
    on_loop(reactor, lambda: (aborting.stream.write(big), aborting.stream.abort()))  # type: ignore[union-attr]
    assert aborting.lost.wait(5)
    received = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while data := aborting_peer.recv(1 << 20):
            received += data
    assert len(received) < len(big)


class Failing(Recorder):
    """A protocol whose ``failing`` callback raises."""

    def __init__(self, failing: str) -> None:
        super().__init__()
        self.failing = failing

    def buffer_updated(self, nbytes: int) -> None:
        if self.failing == "buffer_updated":
            raise RuntimeError("handling failed")
        super().buffer_updated(nbytes)

    def eof_received(self) -> None:
        if self.failing == "eof_received":
            raise RuntimeError("end of file handling failed")
        super().eof_received()


@pytest.mark.parametrize("failing", ["buffer_updated", "eof_received"])
def test_a_failing_protocol_callback_closes_its_stream(reactor: Reactor, failing: str) -> None:
    """An exception from the protocol closes that stream (once), and the loop goes on."""
    ours, peer = socket.socketpair()
    recorder = Failing(failing)
    on_loop(reactor, lambda: Stream(reactor, ours, recorder))
    peer.sendall(b"data")
    if failing == "eof_received":
        peer.shutdown(socket.SHUT_WR)
    assert recorder.lost.wait(5)
    assert recorder.events.count("lost") == 1
    assert on_loop(reactor, lambda: "still running") == "still running"
    peer.close()


def test_a_failed_write_reports_the_loss_after_the_writer_returns(reactor: Reactor) -> None:
    """A write to a reset connection does not call connection_lost inside write() itself."""
    recorder, peer = stream_pair(reactor)
    seen_inside: list[list[str]] = []

    def write_after_reset() -> None:
        stream = recorder.stream
        assert stream is not None
        # Reset inside the callback, so the loop cannot notice the peer's end first.
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        for _ in range(50):  # the first writes may still be accepted by the kernel
            stream.write(b"x" * 65536)
            seen_inside.append(list(recorder.events))

    on_loop(reactor, write_after_reset)
    assert recorder.lost.wait(5)
    assert all("lost" not in events for events in seen_inside)


def test_running_out_of_file_descriptors_pauses_accepting(tmp_path: Path) -> None:
    """With no file descriptor left, the loader logs once a second instead of spinning, and
    accepts again once descriptors are free."""
    script = tmp_path / "emfile.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, resource, socket, time
            import clustorage
            node = clustorage.Node("l", cookie="c" * 32, listen="127.0.0.1:0", data=":memory:")
            port = node.address[1]
            time.sleep(0.2)
            used = len(os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (used + 4, 4096))
            clients = []
            for _ in range(12):
                try:
                    clients.append(socket.create_connection(("127.0.0.1", port)))
                except OSError:
                    break
            start = time.process_time()
            time.sleep(1.5)
            print("cpu", round(time.process_time() - start, 2))
            for client in clients:
                client.close()
            resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
            time.sleep(1.5)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as late:
                print("accepted", len(late.recv(4)))
            node.stop()
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=25)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split() for line in done.stdout.splitlines())
    assert float(lines["cpu"]) < 0.5
    assert lines["accepted"] == "4"
    assert done.stderr.count("cannot accept connections") <= 3
