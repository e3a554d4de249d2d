"""Ctrl-C on a node's main thread while it reads its connection loses nothing: no bytes
taken off the socket, no change read and not applied, no lease of another thread."""

from __future__ import annotations

import _thread
import json
import threading
import time

import pytest

from clustorage import interrupts
from tests.conftest import Cluster, node_pair

pytestmark = pytest.mark.timeout(120)


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
def pester():
    while time.monotonic() < end:
        time.sleep(rng.uniform(0.002, 0.02))
        _thread.interrupt_main()
pestering = threading.Thread(target=pester)
pestering.start()
while pestering.is_alive():
    try:
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
    assert caught > 20  # the test did what it says
    assert drops == []
    assert computed == "from m"
    assert waiter.answer() == {"ok": "from m"}  # fn ran once: m's lease never passed on
    loader_view = json.dumps(sorted(writers[0].ok("sorted(node.keys())")))
    assert json.dumps(sorted(m.ok("sorted(node.keys())"))) == loader_view


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
