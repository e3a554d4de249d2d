"""SPEC's promises under stress, with real processes: replicas converge, busy is not dead,
the loader never stalls, a lost lease is refused, a deadlock is an error."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from tests.conftest import Cluster, Member, free_port
from tests.test_netns import Hosts, namespaces, start_across

pytestmark = pytest.mark.timeout(180)


# Defined in a member: its replica as plain data, {key: [value, version]} and
# {function: [what it returns, version]}, to compare with another node's.
SNAPSHOT = """
def snapshot():
    values = {}
    for key in node.keys():
        try:
            values[key] = [node.get(key), node.version(key, 'value')]
        except clustorage.NotFound:
            pass
    functions = {}
    for name in node.functions():
        try:
            functions[name] = [node.call(name), node.version(name)]
        except clustorage.NotFound:
            pass
    return [values, functions]
"""


def wait_until(check: Callable[[], object], seconds: float, what: str) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {seconds}s: {what}")


def answer_within(member: Member, seconds: float) -> dict[str, Any]:
    """The member's answer to what was started with start_send; fail if it hangs."""
    box: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: box.append(member.answer()), daemon=True)
    reader.start()
    reader.join(seconds)
    if not box:
        raise AssertionError(f"{member.name} gave no answer within {seconds}s (hung)")
    return box[0]


def converged(members: list[Member], reference: Member) -> Callable[[], bool]:
    """A check that every member's replica equals ``reference``'s (a late joiner's)."""

    def check() -> bool:
        wanted = reference.ok("snapshot()")
        return all(member.ok("snapshot()") == wanted for member in members)

    return check


def dropped(cluster: Cluster, names: tuple[str, ...]) -> list[str]:
    """Loader log lines saying one of ``names`` was closed or left."""
    return [
        line
        for line in cluster.loader_log().splitlines()
        if any(f"({name})" in line or f"{name} left" in line for name in names)
        and ("closed" in line or " left" in line)
    ]


def counted_fn(runs: Path, who: str, value: str) -> str:
    """Source of a function ``fn`` that records its run in ``runs`` and returns ``value``."""
    return (
        "def fn():\n"
        f"    with open({str(runs)!r}, 'a') as out:\n"
        f"        out.write({who + chr(10)!r})\n"
        f"    return {value!r}\n"
    )


# -- Replicas converge -------------------------------------------------------------------


def test_a_put_racing_a_delete_leaves_every_replica_equal_to_the_loader(cluster: Cluster) -> None:
    """One member puts k0..k99 (busy thread beside it), another deletes each on sight: all agree."""
    cluster.start_loader()
    putter, deleter, observer = (cluster.member(n) for n in ("putter", "deleter", "observer"))
    putter.start_send(
        "import threading\n"
        "stop = []\n"
        "def busy():\n"
        "    while not stop:\n"
        "        total = 0\n"
        "        for i in range(10000):\n"
        "            total += i\n"
        "spinner = threading.Thread(target=busy, daemon=True)\n"
        "spinner.start()\n"
        "for i in range(100):\n"
        "    node.put(f'k{i}', i)\n"
        "stop.append(True)\n"
        "spinner.join()\n"
    )
    deleted = deleter.ok(
        "import time\n"
        "deleted = set()\n"
        "deadline = time.monotonic() + 90\n"
        "while len(deleted) < 100 and time.monotonic() < deadline:\n"
        "    for key in node.keys():\n"
        "        node.delete(key)\n"
        "        deleted.add(key)\n"
        "len(deleted)"
    )
    assert answer_within(putter, 90) == {"ok": None}
    assert deleted == 100
    late = cluster.member("late")
    members = [putter, deleter, observer, late]
    for member in members:
        member.ok(SNAPSHOT)
    assert late.ok("snapshot()") == [{}, {}]
    wait_until(converged(members[:-1], late), 30, "every replica equals the loader's")


STORM = """
import random, threading, time, pathlib, clustorage
rng = random.Random({seed})
stop = pathlib.Path({stop!r})
storm_errors = []
storm_counts = {{'done': 0, 'outage': 0}}
def storm():
    n = 0
    while not stop.exists():
        n += 1
        op = rng.random()
        key = f's{{rng.randrange(3)}}'
        name = f'g{{rng.randrange(2)}}'
        try:
            if op < 0.4:
                node.put(key, [node.name, n])
            elif op < 0.75:
                node.delete(key)
            elif op < 0.82:
                node.define(name, f'lambda: [{{node.name!r}}, {{n}}]')
            elif op < 0.88:
                node.delete(name, kind='function')
            else:
                node.get(key, lambda: [node.name, n])
            storm_counts['done'] += 1
        except (clustorage.LoaderUnavailable, clustorage.LeaseLost):
            storm_counts['outage'] += 1
            time.sleep(0.05)
        except Exception as exc:
            storm_errors.append(f'{{type(exc).__name__}}: {{exc}}')
def busy():
    while not stop.exists():
        total = 0
        for i in range(10000):
            total += i
storm_thread = threading.Thread(target=storm)
storm_thread.start()
if {busy}:  # a busy thread beside the storm widens the races between answers and pushes
    threading.Thread(target=busy, daemon=True).start()
"""


@pytest.mark.parametrize("store", ["durable", "memory"])
def test_a_storm_with_a_loader_kill_converges_on_every_member(
    cluster: Cluster, tmp_path: Path, store: str
) -> None:
    """Four members put, define and delete a few keys at random; the loader is killed -9 and
    restarted mid-storm (on its store, or on a fresh one in memory); once writes stop every
    replica equals the loader's."""
    seed = 1306
    data = str(tmp_path / "data") if store == "durable" else ":memory:"
    loader = cluster.start_loader(data=data)
    stop = tmp_path / "stop"
    members = [cluster.member(f"m{i}") for i in range(4)]
    for index, member in enumerate(members):
        member.ok(STORM.format(seed=seed + index, stop=str(stop), busy=index < 2))
    time.sleep(1.5)  # let the storm run before the kill: a stimulus, not a measurement
    os.kill(loader.pid, signal.SIGKILL)
    loader.wait(10)
    time.sleep(1.0)
    cluster.start_loader(data=data)
    wait_until(
        lambda: all(m.ok("node.connected") for m in members), 30, f"members reconnect (seed {seed})"
    )
    time.sleep(2)  # and after the restart
    stop.touch()
    for member in members:
        assert member.ok("storm_thread.join(60)\nstorm_thread.is_alive()") is False
        assert member.ok("storm_errors") == [], f"seed {seed}"
        assert member.ok("storm_counts['done']") > 0, member.ok("storm_counts")
    late = cluster.member("late")
    for member in [*members, late]:
        member.ok(SNAPSHOT)
    wait_until(converged(members, late), 30, f"every replica equals the loader's (seed {seed})")


# -- Busy is not dead ----------------------------------------------------------------------


def holding(holder: Member, tmp_path: Path, key: str) -> tuple[Path, Path]:
    """``holder`` gets ``key`` with ``paused`` as its fn, which has started once this
    returns; the file that lets it go on, and the file that records its runs."""
    started, go, runs = tmp_path / "started", tmp_path / "go", tmp_path / "runs"
    holder.start_send(paused_fn(started, go, runs) + f"node.get({key!r}, paused)")
    wait_until(started.exists, 30, "the holder starts its fn")
    return go, runs


def paused_fn(started: Path, go: Path, runs: Path) -> str:
    """Source of a function ``paused`` that touches ``started``, waits for ``go``, records
    its run in ``runs`` and returns 'from holder'."""
    return (
        "import pathlib, time\n"
        "def paused():\n"
        f"    pathlib.Path({str(started)!r}).touch()\n"
        f"    while not pathlib.Path({str(go)!r}).exists():\n"
        "        time.sleep(0.05)\n"
        f"    with open({str(runs)!r}, 'a') as out:\n"
        "        out.write('holder\\n')\n"
        "    return 'from holder'\n"
    )


def short_liveness(cluster: Cluster) -> None:
    """dead_after of 3 s everywhere: a busy node outlasting it must still be alive."""
    cluster.env["CLUSTORAGE_DEAD_AFTER"] = "3"


def test_a_leaseholder_holding_the_gil_keeps_its_lease(cluster: Cluster, tmp_path: Path) -> None:
    """A holder whose fn holds the GIL for seconds (past dead_after) commits; the waiter's fn
    never runs, and nobody is dropped."""
    short_liveness(cluster)
    cluster.start_loader()
    holder, waiter = cluster.member("holder"), cluster.member("waiter")
    started, runs = tmp_path / "started", tmp_path / "runs"
    holder.start_send(
        "import pathlib\n"
        "def busy():\n"
        f"    pathlib.Path({str(started)!r}).touch()\n"
        "    sum(range(5 * 10**8))  # one C call, the GIL held throughout (~7 s here)\n"
        f"    with open({str(runs)!r}, 'a') as out:\n"
        "        out.write('holder\\n')\n"
        "    return 'from holder'\n"
        "node.get('busy', busy)"
    )
    wait_until(started.exists, 30, "the holder starts its fn")
    waiter.start_send(counted_fn(runs, "waiter", "from waiter") + "node.get('busy', fn)")
    assert answer_within(holder, 120) == {"ok": "from holder"}
    assert answer_within(waiter, 60) == {"ok": "from holder"}
    assert runs.read_text() == "holder\n"
    assert dropped(cluster, ("holder", "waiter")) == []
    assert holder.ok("node.connected") and waiter.ok("node.connected")


def test_a_stopped_leaseholder_keeps_its_lease(cluster: Cluster, tmp_path: Path) -> None:
    """A holder SIGSTOPped past dead_after keeps its lease (the waiter sees who holds it), then
    continued, commits; the waiter gets its value."""
    short_liveness(cluster)
    cluster.start_loader()
    holder, waiter = cluster.member("holder"), cluster.member("waiter")
    go, runs = holding(holder, tmp_path, "paused")
    waiter.ok(
        "import threading\n" + counted_fn(runs, "waiter", "from waiter") + "got = []\n"
        "waiting_thread = threading.Thread(target=lambda: got.append(node.get('paused', fn)))\n"
        "waiting_thread.start()\n"
    )
    os.kill(holder.proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: waiter.ok("node.waiting()"), 10, "the waiter sees who computes")
        ((key, who, _since),) = waiter.ok("node.waiting()")
        assert (key, who) == ("paused", "holder")
        time.sleep(5)  # past dead_after (3 s): a stimulus, not a measurement
    finally:
        os.kill(holder.proc.pid, signal.SIGCONT)
    assert waiter.ok("[k for k, who, since in node.waiting()]") == ["paused"]
    go.touch()
    assert answer_within(holder, 60) == {"ok": "from holder"}
    assert waiter.ok("waiting_thread.join(60)\ngot") == ["from holder"]
    assert runs.read_text() == "holder\n"
    assert dropped(cluster, ("holder", "waiter")) == []


def test_a_stopped_leaseholder_keeps_its_lease_while_others_write(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Other members' writes fill a stopped holder's receive window: its kernel still answers
    the loader's probes, so it keeps its connection and its lease past dead_after."""
    short_liveness(cluster)
    cluster.start_loader()
    holder, waiter, writer = (cluster.member(n) for n in ("holder", "waiter", "writer"))
    go, runs = holding(holder, tmp_path, "paused")
    waiter.start_send(counted_fn(runs, "waiter", "from waiter") + "node.get('paused', fn)")
    os.kill(holder.proc.pid, signal.SIGSTOP)
    try:  # about 20 MB pushed to the holder over 6 s: past dead_after (3 s)
        writer.ok(
            "import time\n"
            "for i in range(100):\n"
            "    node.put(f'noise{i % 5}', bytes([i]) * 200_000)\n"
            "    time.sleep(0.06)"
        )
    finally:
        os.kill(holder.proc.pid, signal.SIGCONT)
    go.touch()
    assert answer_within(holder, 60) == {"ok": "from holder"}
    assert answer_within(waiter, 60) == {"ok": "from holder"}
    assert runs.read_text() == "holder\n"
    assert dropped(cluster, ("holder", "waiter")) == []
    assert holder.ok("node.get('noise4')[:1]") == "b'c'"  # caught up


def test_a_killed_leaseholders_lease_passes_on_at_once(cluster: Cluster, tmp_path: Path) -> None:
    """kill -9 of the holder is noticed from the closed socket, long before dead_after."""
    cluster.env["CLUSTORAGE_DEAD_AFTER"] = "600"
    cluster.start_loader()
    holder, waiter = cluster.member("holder"), cluster.member("waiter")
    started, runs = tmp_path / "started", tmp_path / "runs"
    holder.start_send(
        "import pathlib, time\n"
        "def doomed():\n"
        f"    pathlib.Path({str(started)!r}).touch()\n"
        "    time.sleep(600)\n"
        "node.get('doomed', doomed)"
    )
    wait_until(started.exists, 30, "the holder starts its fn")
    waiter.start_send(counted_fn(runs, "waiter", "from waiter") + "node.get('doomed', fn)")
    time.sleep(0.5)
    os.kill(holder.proc.pid, signal.SIGKILL)
    assert answer_within(waiter, 60) == {"ok": "from waiter"}
    assert runs.read_text() == "waiter\n"


# -- A lease lost across a cut link ------------------------------------------------------


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Network namespaces made for this test and removed after it (as in test_netns)."""
    with namespaces(Hosts()) as made:
        yield made


def test_a_cut_off_holders_late_commit_raises_lease_lost(
    cluster: Cluster, hosts: Hosts, tmp_path: Path
) -> None:
    """The holder's link is cut: both ends notice within dead_after, the lease passes to the
    waiter, who commits; healed, the holder reconnects and its commit raises LeaseLost."""
    short_liveness(cluster)
    members = start_across(cluster, hosts, str(tmp_path / "data"))
    holder, waiter = members["a"], members["b"]
    wait_until(lambda: holder.ok("node.connected") and waiter.ok("node.connected"), 30, "joined")
    started, go, runs = tmp_path / "started", tmp_path / "go", tmp_path / "runs"
    holder.ok(
        paused_fn(started, go, runs) + "import threading\n"
        "outcome = []\n"
        "def attempt():\n"
        "    try:\n"
        "        outcome.append(['ok', node.get('contested', paused)])\n"
        "    except Exception as exc:\n"
        "        outcome.append([type(exc).__name__, str(exc)])\n"
        "attempt_thread = threading.Thread(target=attempt)\n"
        "attempt_thread.start()\n"
    )
    wait_until(started.exists, 30, "the holder starts its fn")
    waiter.start_send(counted_fn(runs, "waiter", "from waiter") + "node.get('contested', fn)")
    time.sleep(0.5)
    hosts.cut("a", up=False)
    assert answer_within(waiter, 60) == {"ok": "from waiter"}
    wait_until(lambda: "a left" in cluster.loader_log(), 30, "the loader notices the cut")
    wait_until(lambda: not holder.ok("node.connected"), 30, "the holder notices the cut")
    hosts.cut("a", up=True)
    wait_until(lambda: holder.ok("node.connected"), 30, "the holder reconnects once healed")
    go.touch()
    outcome = holder.ok("attempt_thread.join(60)\noutcome")
    assert len(outcome) == 1 and outcome[0][0] == "LeaseLost", outcome
    assert "contested" in outcome[0][1], outcome
    assert runs.read_text() == "waiter\nholder\n"
    wait_until(
        lambda: holder.ok("node.get('contested')") == "from waiter", 10, "the waiter's value"
    )
    assert waiter.ok("node.get('contested')") == "from waiter"
    assert waiter.ok("node.connected")


# -- A lease outlives the loader's restart -------------------------------------------------


def lease_written(data: str, key: str) -> None:
    """Wait until the loader on ``data`` has written its grant of ``key`` to its lease file:
    a kill -9 loses the grants of the last WRITE_AFTER (README), and a test that kills the
    loader to see a lease outlive it starts past that moment."""
    leases = Path(data) / "app1.sqlite3.leases"
    wait_until(lambda: key in leases.read_text(), 10, f"the grant of {key!r} is written")


def computing(member: Member) -> list[list[str]]:
    """``[key, holder]`` of each lease the loader knows of, as an idle member asks it."""
    return [[key, holder] for key, holder, _ in computing_of(member)]


def computing_of(member: Member) -> list[list[Any]]:
    """``[key, holder, waiters]`` of each lease the loader knows of, as ``member`` asks."""
    return member.ok(  # type: ignore[no-any-return]
        "[[c['key'], c['holder'], c['waiters']] "
        "for c in node.status().get('cluster', {}).get('computing', [])]"
    )


class Contest(NamedTuple):
    """A holder computing ``key`` (until ``go`` exists), a waiter queued for it, and an
    idle watcher to ask the loader; ``runs`` records whose fn ran."""

    holder: Member
    waiter: Member
    watcher: Member
    go: Path
    runs: Path


def contest(cluster: Cluster, tmp_path: Path, key: str) -> Contest:
    holder, waiter, watcher = (cluster.member(name) for name in ("holder", "waiter", "watcher"))
    go, runs = holding(holder, tmp_path, key)
    waiter.start_send(counted_fn(runs, "waiter", "from waiter") + f"node.get({key!r}, fn)")
    waiting = "[c['waiters'] for c in node.status().get('cluster', {}).get('computing', [])]"
    wait_until(lambda: watcher.ok(waiting) == [["waiter"]], 10, "the waiter is queued")
    assert computing(watcher) == [[key, "holder"]]
    return Contest(holder, waiter, watcher, go, runs)


@pytest.mark.parametrize("back_first", ["holder", "waiter"])
def test_a_loader_restarted_while_a_fn_runs_keeps_it_the_only_one(
    cluster: Cluster, tmp_path: Path, back_first: str
) -> None:
    """The loader is killed -9 and restarted on its store while one member computes a key and
    another waits for it. Whichever member reconnects first, the waiter neither gives up nor
    computes: the holder reclaims its lease, the waiter asks again naming the holder, and
    both get the holder's value (SPEC "get" 3 and 6)."""
    data = str(tmp_path / "data")
    loader = cluster.start_loader(data=data)
    holder, waiter, watcher, go, runs = contest(cluster, tmp_path, "restarted")
    late = holder if back_first == "waiter" else waiter
    os.kill(late.proc.pid, signal.SIGSTOP)  # it comes back after the other one
    try:
        os.kill(loader.pid, signal.SIGKILL)
        loader.wait(10)
        cluster.start_loader(data=data)
        wait_until(
            lambda: computing(watcher) == [["restarted", "holder"]],
            30,
            f"the {back_first} reconnects, and the restarted loader keeps the key for the holder",
        )
    finally:
        os.kill(late.proc.pid, signal.SIGCONT)
    go.touch()
    assert answer_within(holder, 60) == {"ok": "from holder"}
    assert answer_within(waiter, 60) == {"ok": "from holder"}
    assert runs.read_text() == "holder\n"
    assert computing(watcher) == []


def test_a_get_in_flight_when_the_loader_dies_asks_again(cluster: Cluster, tmp_path: Path) -> None:
    """A get sent to a loader that never answers it (stopped, then killed -9) asks the
    restarted loader again, and waits there for the holder's value."""
    data = str(tmp_path / "data")
    loader = cluster.start_loader(data=data)
    holder, waiter = cluster.member("holder"), cluster.member("waiter")
    go, runs = holding(holder, tmp_path, "unanswered")
    wait_until(lambda: computing(waiter) == [["unanswered", "holder"]], 10, "the lease is known")
    lease_written(data, "unanswered")
    os.kill(loader.pid, signal.SIGSTOP)
    try:
        waiter.start_send(counted_fn(runs, "waiter", "from waiter") + "node.get('unanswered', fn)")
        time.sleep(0.5)  # the request is sent, and not answered: a stimulus
    finally:
        os.kill(loader.pid, signal.SIGKILL)
        loader.wait(10)
    cluster.start_loader(data=data)
    go.touch()
    assert answer_within(holder, 60) == {"ok": "from holder"}
    assert answer_within(waiter, 60) == {"ok": "from holder"}
    assert runs.read_text() == "holder\n"


def test_a_commit_cut_off_while_the_loader_is_down_goes_once_it_is_back(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The holder's fn ends while the loader is down for longer than the node's timeout: its
    commit waits (for the timeout and dead_after), goes once the loader is back, and the
    waiter gets that value."""
    cluster.env["CLUSTORAGE_TIMEOUT"] = "2"
    cluster.env["CLUSTORAGE_DEAD_AFTER"] = "10"
    data = str(tmp_path / "data")
    loader = cluster.start_loader(data=data)
    holder, _, watcher, go, runs = contest(cluster, tmp_path, "late")
    os.kill(loader.pid, signal.SIGKILL)
    loader.wait(10)
    go.touch()  # the fn ends; its commit finds no loader
    time.sleep(3)  # past the timeout (2 s): a stimulus, not a measurement
    cluster.start_loader(data=data)
    assert answer_within(holder, 60) == {"ok": "from holder"}
    assert runs.read_text() == "holder\n"
    assert watcher.ok("node.get('late')") == "from holder"


def test_a_holder_whose_commit_finds_no_loader_does_not_pin_its_key(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The loader stays down past the holder's last try: its get raises LoaderUnavailable,
    and once the loader is back the key is free: the next get computes it."""
    short_liveness(cluster)
    cluster.env["CLUSTORAGE_TIMEOUT"] = "1"
    data = str(tmp_path / "data")
    loader = cluster.start_loader(data=data)
    holder = cluster.member("holder")
    go, _ = holding(holder, tmp_path, "pinned")
    os.kill(loader.pid, signal.SIGKILL)
    loader.wait(10)
    go.touch()
    answer = answer_within(holder, 60)
    assert answer.get("error") == "LoaderUnavailable", answer
    cluster.start_loader(data=data)
    wait_until(lambda: holder.ok("node.connected"), 30, "the holder reconnects")
    assert holder.ok("node.get('pinned', lambda: 'again')") == "again"


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_a_new_get_after_the_loader_restarted_waits_for_the_holder(
    cluster: Cluster, tmp_path: Path, stop: int
) -> None:
    """The restarted loader finds the leases it had granted (its lease file; a loader
    stopped cleanly hands none on as it closes its connections): a get that comes before
    the holder is back waits for the holder's value instead of computing."""
    data = str(tmp_path / "data")
    loader = cluster.start_loader(data=data)
    holder, other = cluster.member("holder"), cluster.member("other")
    go, runs = holding(holder, tmp_path, "fresh")
    wait_until(lambda: computing(other) == [["fresh", "holder"]], 10, "the lease is known")
    lease_written(data, "fresh")
    os.kill(holder.proc.pid, signal.SIGSTOP)  # it comes back after the other one
    try:
        os.kill(loader.pid, stop)
        loader.wait(10)
        cluster.start_loader(data=data)
        wait_until(lambda: other.ok("node.connected"), 30, "the other member reconnects")
        assert computing(other) == [["fresh", "holder"]]
        other.start_send(counted_fn(runs, "other", "from other") + "node.get('fresh', fn)")
    finally:
        os.kill(holder.proc.pid, signal.SIGCONT)
    go.touch()
    assert answer_within(holder, 60) == {"ok": "from holder"}
    assert answer_within(other, 60) == {"ok": "from holder"}
    assert runs.read_text() == "holder\n"


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_a_value_computed_across_a_restart_does_not_undo_a_delete_made_meanwhile(
    cluster: Cluster, tmp_path: Path, stop: int
) -> None:
    """While fn runs, another node puts the key and deletes it, and the loader restarts:
    the holder's value is refused (LeaseLost), as it is without a restart, and the key
    stays deleted everywhere. The restarted loader has forgotten which leases the put
    ended; the lease's token says the key's version when it was given (it used to store
    the value over the delete)."""
    data = str(tmp_path / "data")
    loader = cluster.start_loader(data=data)
    holder, writer = cluster.member("holder"), cluster.member("writer")
    go, runs = holding(holder, tmp_path, "fresh")
    lease_written(data, "fresh")
    assert writer.ok("node.put('fresh', 'put meanwhile')") == 1
    writer.ok("node.delete('fresh')")
    os.kill(loader.pid, stop)
    loader.wait(10)
    cluster.start_loader(data=data)
    go.touch()
    answer = answer_within(holder, 60)
    assert answer.get("error") == "LeaseLost", answer
    wait_until(lambda: writer.ok("node.connected"), 30, "the writer reconnects")
    assert "fresh" not in holder.ok("node.keys()")
    assert writer.ok("node.get('fresh', lambda: 'after the delete')") == "after the delete"
    assert runs.read_text() == "holder\n"


def test_a_holder_that_never_comes_back_passes_its_lease_to_the_waiter(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The holder dies while the loader restarts: the waiter's key waits for it for
    dead_after and the timeout, then the waiter computes it."""
    short_liveness(cluster)
    data = str(tmp_path / "data")
    loader = cluster.start_loader(data=data)
    holder, waiter, _, _, runs = contest(cluster, tmp_path, "orphaned")
    os.kill(holder.proc.pid, signal.SIGKILL)
    os.kill(loader.pid, signal.SIGKILL)
    loader.wait(10)
    cluster.start_loader(data=data)
    assert answer_within(waiter, 60) == {"ok": "from waiter"}
    assert runs.read_text() == "waiter\n"


def test_a_waiter_whose_loader_stays_down_raises_loader_unavailable(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Cut off while queued and the loader does not come back: after the node's timeout the
    waiter's get raises LoaderUnavailable, saying how to start the loader."""
    cluster.env["CLUSTORAGE_TIMEOUT"] = "2"
    loader = cluster.start_loader()
    _, waiter, _, _, runs = contest(cluster, tmp_path, "stranded")
    os.kill(loader.pid, signal.SIGKILL)
    answer = answer_within(waiter, 60)
    assert answer.get("error") == "LoaderUnavailable", answer
    assert "clustorage loader --name app1" in answer["message"]
    assert not runs.exists()


# -- The loader never stalls --------------------------------------------------------------


def test_a_big_commit_does_not_stall_other_members(cluster: Cluster, tmp_path: Path) -> None:
    """While a ~600 MB put is sent and committed to a durable store, another member's misses and
    puts are all served, nobody is dropped, and the big put returns its version."""
    cluster.start_loader(data=str(tmp_path / "data"))
    big, small = cluster.member("big"), cluster.member("small")
    done = tmp_path / "big-done"
    big.start_send(
        "import pathlib\n"
        "version = node.put('big', bytes(600 * 10**6))\n"
        f"pathlib.Path({str(done)!r}).touch()\n"
        "version"
    )
    served, failure = small.ok(
        "import pathlib, time\n"
        f"done = pathlib.Path({str(done)!r})\n"
        "served, failure = 0, None\n"
        "deadline = time.monotonic() + 120\n"
        "while (served < 50 or not done.exists()) and time.monotonic() < deadline:\n"
        "    try:\n"
        "        what = f'miss{served}'\n"
        "        assert node.get(what, lambda: served) == served\n"
        "        what = f'put small{served}'\n"
        "        node.put(f'small{served}', served)\n"
        "    except clustorage.ClustorageError as exc:\n"
        "        failure = f'{what}: {type(exc).__name__}: {exc}'\n"
        "        break\n"
        "    served += 1\n"
        "[served, failure]"
    )
    answer = answer_within(big, 120)
    assert failure is None, f"after {served} served, during the big put: {failure}"
    assert served >= 50
    assert answer == {"ok": 1}, answer
    assert dropped(cluster, ("big", "small")) == []
    assert big.ok("node.connected") and small.ok("node.connected")
    assert small.ok("node.get('small0')") == 0


def test_a_member_reading_beside_a_big_push_is_not_dropped(cluster: Cluster) -> None:
    """A member busy with its own requests while a 200 MB value (over the loader's backlog cap)
    goes out is reading, not stalled: it is not dropped, and it gets the value."""
    cluster.start_loader()
    big, reader = cluster.member("big"), cluster.member("reader")
    reader.ok(
        "import threading\n"
        "served, failures, stop = [0], [], []\n"
        "def misses():\n"
        "    while not stop:\n"
        "        try:\n"
        "            node.get(f'miss{served[0]}', lambda: 0)\n"
        "        except clustorage.ClustorageError as exc:\n"
        "            failures.append(f'{type(exc).__name__}: {exc}')\n"
        "            return\n"
        "        served[0] += 1\n"
        "misses_thread = threading.Thread(target=misses)\n"
        "misses_thread.start()\n"
    )
    assert big.ok("node.put('big', bytes(200 * 10**6))") == 1
    assert reader.ok("stop.append(1)\nmisses_thread.join(60)\nfailures") == []
    assert reader.ok("served[0]") > 0
    assert dropped(cluster, ("big", "reader")) == []
    assert reader.ok("len(node.get('big'))") == 200 * 10**6


def test_a_slow_definition_does_not_stall_other_members(cluster: Cluster, tmp_path: Path) -> None:
    """Compiling source that sleeps 3 s at import delays only its define: other members' misses
    are served meanwhile, nobody is dropped, and the function works everywhere after."""
    cluster.start_loader()
    definer, one, two = (cluster.member(n) for n in ("definer", "one", "two"))
    done = tmp_path / "defined"
    definer.start_send(
        "import pathlib\n"
        "d = node.define('slow', 'import time\\ntime.sleep(3)\\ndef slow(): return 1')\n"
        f"pathlib.Path({str(done)!r}).touch()\n"
        "[d.version, sorted(d.installed)]"
    )
    misses = (
        "import pathlib, time\n"
        f"done = pathlib.Path({str(done)!r})\n"
        "served = 0\n"
        "deadline = time.monotonic() + 120\n"
        "while (served < 20 or not done.exists()) and time.monotonic() < deadline:\n"
        "    assert node.get(f'{node.name}{served}', lambda: served) == served\n"
        "    served += 1\n"
        "served"
    )
    one.start_send(misses)
    assert two.ok(misses) >= 20
    assert answer_within(one, 120)["ok"] >= 20
    answer = answer_within(definer, 120)
    assert "ok" in answer, answer
    assert answer["ok"][0] == 1
    assert {"definer", "one", "two"} <= set(answer["ok"][1])
    for member in (definer, one, two):
        assert member.ok("node.call('slow')") == 1
    assert dropped(cluster, ("definer", "one", "two")) == []


# -- DeadlockError -----------------------------------------------------------------------


def test_a_fn_that_needs_its_own_key_raises_deadlock_error(cluster: Cluster) -> None:
    """On the loader's own node and on a member, re-entering a key (directly or through
    another key) raises DeadlockError naming the keys; the lease is free afterwards."""
    address = f"127.0.0.1:{free_port()}"
    env = dict(cluster.env, CLUSTORAGE_LISTEN=address, CLUSTORAGE_DATA=":memory:")
    loader = Member(env, "app1", None, log=cluster.log_of("app1"))
    cluster.procs.append(loader.proc)
    member = cluster.member("m", f"app1@{address}")
    for node in (loader, member):
        key = f"loop-{node.name}"
        node.start_send(f"node.get({key!r}, lambda: node.get({key!r}, lambda: 1))")
        answer = answer_within(node, 60)
        assert answer.get("error") == "DeadlockError", answer
        assert key in answer["message"], answer
        assert node.ok("issubclass(clustorage.DeadlockError, RuntimeError)")
        assert node.ok(f"node.get({key!r}, lambda: 2)") == 2
    member.start_send(
        "node.get('alpha', lambda: node.get('beta', lambda: node.get('alpha', lambda: 1)))"
    )
    answer = answer_within(member, 60)
    assert answer.get("error") == "DeadlockError", answer
    assert "alpha" in answer["message"] and "beta" in answer["message"], answer
    assert member.ok("node.get('alpha', lambda: 3)") == 3


@pytest.mark.parametrize("size", [2, 3])
def test_a_cycle_across_members_raises_deadlock_error_on_one(
    cluster: Cluster, tmp_path: Path, size: int
) -> None:
    """Each member computes its key needing the next member's, round a cycle: one gets
    DeadlockError naming every key of it, the others complete with one value; nothing hangs."""
    cluster.start_loader()
    keys = ["alpha", "beta", "gamma"][:size]
    members = [cluster.member(f"m{i}") for i in range(size)]
    for index, member in enumerate(members):
        mine, other = keys[index], keys[(index + 1) % size]
        held, theirs = tmp_path / f"{mine}-held", tmp_path / f"{other}-held"
        member.start_send(
            "import pathlib, time\n"
            "def needs_other():\n"
            f"    pathlib.Path({str(held)!r}).touch()\n"
            f"    while not pathlib.Path({str(theirs)!r}).exists():\n"
            "        time.sleep(0.02)\n"
            f"    return node.get({other!r}, lambda: 'from ' + node.name)\n"
            f"node.get({mine!r}, needs_other)"
        )
    answers = {member.name: answer_within(member, 60) for member in members}
    errors = [a for a in answers.values() if "error" in a]
    assert len(errors) == 1, answers
    assert errors[0]["error"] == "DeadlockError", answers
    assert all(key in errors[0]["message"] for key in keys), answers
    values = {a["ok"] for a in answers.values() if "ok" in a}
    assert len(values) == 1, answers
    (value,) = values
    assert value in {f"from {member.name}" for member in members}
    for member in members:
        assert member.ok(f"[node.get(key) for key in {keys!r}]") == [value] * size
