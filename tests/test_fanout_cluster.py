"""The fan-out with real processes: writers racing on a few keys, so that the loader's
passes coalesce their changes, leave every replica equal to the loader's, and an on_load
listener hears each key's versions in increasing order, ending with the last."""

from __future__ import annotations

import os
import signal

import pytest

from tests.conftest import Cluster, stop_process
from tests.test_promises import SNAPSHOT, answer_within, converged, wait_until

pytestmark = pytest.mark.timeout(180)

LISTEN = """
heard = {}
def listen(event):
    if event.kind == 'value':
        heard.setdefault(event.key, []).append(-1 if event.removed else event.version)
unlisten = node.on_load(listen)
"""

RACE = """
for i in range(400):
    key = f'hot{i % 3}'
    if i % 50 == 49:
        node.delete(key)
    else:
        node.put(key, [node.name, i])
"""


@pytest.mark.parametrize("store", ["durable", "memory"])
def test_racing_writers_on_a_few_keys_converge_and_listeners_hear_versions_in_order(
    cluster: Cluster, store: str
) -> None:
    """Four members put and delete three keys at once; afterwards every replica equals a
    late joiner's, and a listening member heard only ever newer versions of each key."""
    cluster.start_loader(data=str(cluster.tmp / "data") if store == "durable" else ":memory:")
    listener = cluster.member("listener")
    listener.ok(LISTEN)
    writers = [cluster.member(f"w{i}") for i in range(4)]
    for writer in writers:
        writer.start_send(RACE)
    for writer in writers:
        assert answer_within(writer, 120) == {"ok": None}
    late = cluster.member("late")
    members = [*writers, listener, late]
    for member in members:
        member.ok(SNAPSHOT)
    wait_until(converged([*writers, listener], late), 30, "every replica equals the loader's")
    listener.ok("unlisten()")
    final = late.ok("{key: node.version(key, 'value') for key in node.keys()}")
    heard = listener.ok("heard")
    assert set(heard) == {"hot0", "hot1", "hot2"}
    for key, versions in heard.items():
        installed = [version for version in versions if version != -1]
        assert installed == sorted(set(installed)), (key, versions)
        if key in final:
            assert versions[-1] == final[key]


INTERRUPTED = """
import _thread, threading
timer = threading.Timer(0.3, _thread.interrupt_main)
timer.start()
try:
    {write}
    outcome = 'returned'
except KeyboardInterrupt:
    outcome = 'interrupted'
finally:
    timer.cancel()
outcome
"""


@pytest.mark.parametrize(
    ("write", "after"), [("node.put('k', 'v2')", "v2"), ("node.delete('k')", None)]
)
def test_a_writer_that_stopped_waiting_for_its_write_ends_with_it(
    cluster: Cluster, write: str, after: str | None
) -> None:
    """Ctrl-C while the loader is busy: the write is done all the same and pushed to
    everyone but its writer, whose caller is gone; the writer's replica catches up."""
    loader = cluster.start_loader(data=str(cluster.tmp / "data"))
    writer, other = cluster.member("writer"), cluster.member("other")
    writer.ok("node.put('k', 'v1')")
    wait_until(
        lambda: other.ok("node.get('k') if 'k' in node.keys() else None") == "v1",
        30,
        "other has v1",
    )
    stop_process(loader.pid)  # busy for a moment: the write waits for its answer
    try:
        assert writer.ok(INTERRUPTED.format(write=write)) == "interrupted"
    finally:
        os.kill(loader.pid, signal.SIGCONT)
    wait_until(
        lambda: other.ok("node.get('k') if 'k' in node.keys() else None") == after,
        30,
        "the other node has it",
    )
    wait_until(
        lambda: writer.ok("node.get('k') if 'k' in node.keys() else None") == after,
        30,
        "the writer has it",
    )
