"""Ctrl-C on a node's main thread while it reads its connection loses nothing: no bytes
taken off the socket, no change read and not applied, no lease of another thread."""

from __future__ import annotations

import _thread
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

import pytest

import clustorage
from clustorage import interrupts
from tests.conftest import COOKIE, Cluster, Member, node_pair, stop_process
from tests.test_promises import answer_within, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def ctrl_c_is_pythons() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt here, as in a terminal, even where the tests were
    started in the background (a shell then has it ignored, and Python keeps that)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_ctrl_c_in_a_section_is_raised_as_it_ends() -> None:
    interrupts.hold()
    try:
        _thread.interrupt_main()
        time.sleep(0.01)  # a Python handler runs between bytecodes: it would have by now
        interrupts.hold()
        interrupts.release()  # not the outermost: nothing yet
    except KeyboardInterrupt:  # pragma: no cover - the failure this test is for
        interrupts.release()
        pytest.fail("Ctrl-C came inside the section")
    with pytest.raises(KeyboardInterrupt):
        interrupts.release()
    with pytest.raises(KeyboardInterrupt):  # outside any section: at once, as before
        _thread.interrupt_main()
        time.sleep(1)


def test_a_ctrl_c_in_a_section_is_raised_at_a_safe_point() -> None:
    interrupts.hold()
    try:
        _thread.interrupt_main()
        time.sleep(0.01)
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    finally:
        interrupts.release()


# Member m: one thread computes 'k' (others wait for its lease), while the main thread waits
# for 'slow', another node's lease, reading the pushes of busy writers, and is sent Ctrl-C
# every few milliseconds.
PESTERED = """
import _thread, logging, random, threading, time
drops = []
class Drops(logging.Handler):
    def emit(self, record):
        if 'lost the loader' in record.getMessage():
            drops.append(record.getMessage())
logging.getLogger('clustorage').addHandler(Drops())
computed = {}
def compute():
    computed['k'] = node.get('k', lambda: time.sleep(3) or 'from m')
computing = threading.Thread(target=compute)
computing.start()
time.sleep(0.3)
rng = random.Random(5)
caught = 0
end = time.monotonic() + 2.5
def pester():  # for 2.5 s, and on (up to 15 s more) until 30 were caught
    while time.monotonic() < end or (caught < 30 and time.monotonic() < end + 15):
        time.sleep(rng.uniform(0.002, 0.02))
        _thread.interrupt_main()
pestering = threading.Thread(target=pester)
pestering.start()
while True:
    try:  # the check too: a Ctrl-C may land on it
        if not pestering.is_alive():
            break
        node.get('slow', lambda: 'from m')
    except KeyboardInterrupt:
        caught += 1
time.sleep(0.1)
computing.join(30)
[caught, drops, computed.get('k')]
"""


def test_ctrl_c_while_reading_keeps_the_connection_and_its_leases(cluster: Cluster) -> None:
    cluster.start_loader()
    holder = cluster.member("h")
    holder.start_send("import time\nnode.get('slow', lambda: time.sleep(60) or 'from h')")
    m = cluster.member("m")
    waiter = cluster.member("o")
    writers = [cluster.member(f"w{i}") for i in range(2)]
    time.sleep(0.5)
    m.start_send(PESTERED)
    time.sleep(0.6)
    waiter.start_send("node.get('k', lambda: 'from o')")
    for writer in writers:
        writer.start_send(
            "import os\n"
            "for i in range(800):\n"
            "    node.put(f'{node.name}-{i}', os.urandom(200))\n"
            "'done'"
        )
    for writer in writers:
        assert writer.answer() == {"ok": "done"}
    answer = m.answer()
    assert "ok" in answer, answer
    caught, drops, computed = answer["ok"]
    assert caught >= 30  # the test did what it says
    assert drops == []
    assert computed == "from m"
    assert waiter.answer() == {"ok": "from m"}  # fn ran once: m's lease never passed on

    def keys(member: Member) -> str:
        return json.dumps(sorted(member.ok("sorted(node.keys())")))

    # m's replica equals another node's once the push of m's own value, which goes out
    # after m's answer (off the request path), has reached that node too.
    wait_until(lambda: keys(m) == keys(writers[0]), 10, "m's replica equals the others'")


def test_ctrl_c_during_a_put_while_disconnected_ends_it_at_once(cluster: Cluster) -> None:
    """A put waits for the loader to come back (its timeout): Ctrl-C ends the wait then and
    there, not at the end of the timeout, and not in place of its LoaderUnavailable."""
    loader = cluster.start_loader()
    m = cluster.member("m")
    loader.kill()
    loader.wait(10)
    outcome = m.ok(
        "import _thread, threading, time\n"
        "deadline = time.monotonic() + 30\n"
        "while node.connected and time.monotonic() < deadline: time.sleep(0.02)\n"
        "threading.Timer(0.3, _thread.interrupt_main).start()\n"
        "try:\n"
        "    node.put('b', 2)\n"
        "    outcome = ['returned']\n"
        "except KeyboardInterrupt as exc:\n"
        "    outcome = ['KeyboardInterrupt', type(exc.__context__).__name__]\n"
        "except Exception as exc:\n"
        "    outcome = [type(exc).__name__]\n"
        "outcome"
    )
    assert outcome == ["KeyboardInterrupt", "NoneType"]


def test_ctrl_c_during_the_loader_nodes_put_ends_its_wait() -> None:
    """The loader's own node waits for its loop (busy for seconds): Ctrl-C ends the wait
    before the loop is free again."""
    with node_pair() as (loader, _member):
        loop = loader._channel.loop  # type: ignore[attr-defined]
        free: list[bool] = []
        loop.call_soon_threadsafe(time.sleep, 3)
        loop.call_soon_threadsafe(free.append, True)
        loader.timeout = 20
        timer = threading.Timer(0.3, _thread.interrupt_main)
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            loader.put("k", 1)
        assert free == []  # the loop was still busy
        timer.join()


def test_outside_a_section_sigints_handler_is_left_as_it_was() -> None:
    before = signal.getsignal(signal.SIGINT)
    interrupts.hold()
    try:
        assert signal.getsignal(signal.SIGINT) is not before
    finally:
        interrupts.release()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_handler_that_passes_ctrl_c_on_meets_it_once() -> None:
    """A handler installed between two requests that calls the one before it (as unittest's
    --catch does): one Ctrl-C, one call of it, one KeyboardInterrupt."""
    interrupts.hold()
    interrupts.release()
    before = signal.getsignal(signal.SIGINT)
    calls: list[int] = []

    def passing_on(signum: int, frame: FrameType | None) -> None:
        calls.append(signum)
        before(signum, frame)  # type: ignore[operator]

    signal.signal(signal.SIGINT, passing_on)
    try:
        interrupts.hold()
        interrupts.release()
        with pytest.raises(KeyboardInterrupt):
            _thread.interrupt_main()
            time.sleep(1)
        assert calls == [signal.SIGINT]
        interrupts.hold()
        try:
            _thread.interrupt_main()
            time.sleep(0.01)
            assert calls == [signal.SIGINT]  # held back
        finally:
            with pytest.raises(KeyboardInterrupt):
                interrupts.release()
        assert calls == [signal.SIGINT, signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, before)


def test_ctrl_c_ends_a_get_while_another_thread_uploads_to_a_stopped_loader(
    cluster: Cluster,
) -> None:
    """Another thread of the node is in the middle of a big put to a loader that reads
    nothing (stopped): the main thread's get, waiting to send, ends at Ctrl-C, without
    waiting for the upload (and the withdrawal of its request does not wait either)."""
    loader = cluster.start_loader()
    m = cluster.member("m")
    m.ok(
        "import _thread, logging, threading, time\n"
        "big = bytes(64 << 20)\n"
        "drops = []\n"
        "class Drops(logging.Handler):\n"
        "    def emit(self, record):\n"
        "        if 'lost the loader' in record.getMessage():\n"
        "            drops.append(record.getMessage())\n"
        "logging.getLogger('clustorage').addHandler(Drops())"
    )
    stop_process(loader.pid)
    try:
        m.start_send(
            "putting = threading.Thread(target=lambda: node.put('huge', big), daemon=True)\n"
            "putting.start()\n"
            "time.sleep(1)\n"
            "threading.Timer(0.5, _thread.interrupt_main).start()\n"
            "try:\n"
            "    node.get('small', lambda: 1)\n"
            "    outcome = ['returned']\n"
            "except KeyboardInterrupt:\n"
            "    outcome = ['interrupted', list(drops)]\n"
            "outcome"
        )
        answer = answer_within(m, 30)
    finally:
        os.kill(loader.pid, signal.SIGCONT)
    assert answer == {"ok": ["interrupted", []]}  # not by the connection dropping


def test_ctrl_c_while_applying_a_definition_loses_no_push(cluster: Cluster) -> None:
    """The main thread reads its connection, with two definitions arrived unread; another
    thread of its node holds the send lock (a long upload) and the user presses Ctrl-C.
    Applying the first definition waits to send its acknowledgement: the Ctrl-C is raised
    once what was read is applied and acknowledged, not in the middle, which would lose
    the acknowledgement and the second definition, read off the socket with it."""
    cluster.start_loader()
    assert threading.current_thread() is threading.main_thread()
    with (
        clustorage.Node("d", cluster.loader, cookie=COOKIE) as definer,
        clustorage.Node("m", cluster.loader, cookie=COOKIE) as node,
    ):
        client = node._channel
        defined: dict[str, object] = {}

        def define(name: str) -> None:
            defined[name] = definer.define(name, f"def {name}():\n    return 1\n")

        assert client._take_io()  # as a caller reading its answer: nobody else reads
        sending, done = threading.Event(), threading.Event()

        def upload() -> None:  # another thread of m sends, for long
            with client._send_lock:
                sending.set()
                time.sleep(0.5)
                os.kill(os.getpid(), signal.SIGINT)
                done.wait(1)

        try:
            for name in ("f", "g"):
                threading.Thread(target=define, args=(name,), daemon=True).start()
                time.sleep(0.3)  # its push arrives, unread
            threading.Thread(target=upload, daemon=True).start()
            assert sending.wait(10)
            with pytest.raises(KeyboardInterrupt):
                client._read_until(lambda: False, 10.0, lambda: False)
        finally:
            done.set()
            client._release_io()
        wait_until(lambda: len(defined) == 2, 30, "both definitions acknowledged or timed out")
        assert {"f", "g"} <= set(node.functions()), "a push read was dropped"
        assert node.connected
