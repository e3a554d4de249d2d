"""End to end: a real loader process and real member processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

import clustorage
from clustorage import codec
from clustorage.channel import Pending
from clustorage.member import LINGER, MemberClient, _Lost
from clustorage.messages import Commit, Fetch, Put, Queued, Sync
from clustorage.protocol import Connection
from clustorage.store import SQLiteStore
from tests.conftest import COOKIE, Cluster, Member, node_pair, stop_process
from tests.test_promises import (
    answer_within,
    computing_of,
    counted_fn,
    lease_written,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

SUM = "def sum(a, b):\n    return a + b\n"


def test_get_computes_once_across_four_processes(cluster: Cluster, tmp_path: Path) -> None:
    """Four members miss the same key at once; fn runs once and all get its value."""
    cluster.start_loader()
    runs = tmp_path / "runs"
    go = tmp_path / "go"
    members = [cluster.member(f"m{i}") for i in range(4)]
    program = (
        "import os, time\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.005)\n"
        "def fn():\n"
        f"    with open({str(runs)!r}, 'a') as f: f.write(node.name + '\\n')\n"
        "    time.sleep(0.3)\n"
        "    return {'answer': 42, 'by': node.name}\n"
        "node.get('expensive', fn)"
    )
    for member in members:
        member.start_send(program)
    go.touch()
    answers = [member.answer() for member in members]
    values = [answer["ok"] for answer in answers]
    assert len(runs.read_text().splitlines()) == 1
    assert all(value == values[0] for value in values)
    assert values[0]["answer"] == 42


def test_list_key_joins_with_dots(cluster: Cluster) -> None:
    """A list key is its parts joined by '.', the same key from every node."""
    cluster.start_loader()
    a, b = cluster.member("a"), cluster.member("b")
    assert a.ok("node.get(['user', 42], lambda: 'ada')") == "ada"
    assert b.ok("node.get('user.42')") == "ada"
    assert "user.42" in b.ok("node.keys()")


def test_call_with_def_and_lambda_source(cluster: Cluster) -> None:
    """call compiles def source and lambda source on the loader and returns the result."""
    cluster.start_loader()
    a = cluster.member("a")
    assert a.ok(f"node.call('sum', [1, 4], lambda: {SUM!r})") == 5
    assert a.ok("node.call('sum', [2, 3])") == 5
    assert a.ok("node.call('mul', [3, 4], 'lambda a, b: a * b')") == 12
    assert a.ok("node.call('mul', (5, 6))") == 30


def test_function_defined_on_one_member_is_already_in_the_others(cluster: Cluster) -> None:
    """After define returns on A, B holds the function locally: it works with the loader gone."""
    loader = cluster.start_loader()
    a, b = cluster.member("a"), cluster.member("b")
    definition = a.ok(f"node.define('sum', {SUM!r})")
    assert sorted(definition[3]) == ["a", "app1", "b"]
    assert b.ok("node.version('sum')") == 1
    loader.kill()
    loader.wait(10)
    assert b.ok("node.call('sum', [1, 4])") == 5
    assert b.ok("sum_ = clustorage.functions.sum; sum_(2, 2)") == 4


def test_a_node_that_cannot_load_a_definition_is_reported_missing(cluster: Cluster) -> None:
    """A definition that imports a module only the loader and its author have: define
    returns at once, listing the node without it as missing, not as installed."""
    modules = cluster.tmp / "modules"
    modules.mkdir()
    (modules / "onlyhere.py").write_text("X = 7\n")
    plain = dict(cluster.env)
    cluster.env["PYTHONPATH"] = f"{modules}:{plain.get('PYTHONPATH', '')}"
    cluster.start_loader()
    a = cluster.member("a")
    cluster.env = plain
    b = cluster.member("b")
    source = "import onlyhere\ndef f():\n    return onlyhere.X\n"
    _, version, _, installed, missing = a.ok(f"tuple(node.define('f', {source!r}))")
    assert (version, sorted(installed), missing) == (1, ["a", "app1"], ["b"])
    assert a.ok("node.call('f')") == 7
    assert b.ok("'f' in node.functions()") is False


def test_late_joiner_sees_earlier_values_and_functions(cluster: Cluster) -> None:
    """A member that connects later holds earlier values and functions before it asks."""
    cluster.start_loader()
    a = cluster.member("a")
    a.ok("node.get('hello', lambda: 'world')")
    a.ok(f"node.define('sum', {SUM!r})")
    late = cluster.member("late")
    assert late.ok("sorted(node.keys()), sorted(node.functions())") == [["hello"], ["sum"]]
    assert late.ok("node.get('hello', lambda: 'not me')") == "world"


def test_bad_source_raises_compile_error_and_loads_nothing(cluster: Cluster) -> None:
    """Bad source: CompileError with <cluster:NAME>, line and column; no node has it."""
    cluster.start_loader()
    a, b = cluster.member("a"), cluster.member("b")
    answer = a.send("node.define('bad', 'def bad(a, b):\\n    return a +\\n')")
    assert answer["error"] == "CompileError"
    assert "<cluster:bad>, line 2" in answer["message"]
    answer = a.send("node.call('nodef', [], 'x = 1')")
    assert answer["error"] == "CompileError"
    assert "does not define" in answer["message"]
    answer = a.send("node.call('nodef', [], 'def other():\\n    return 1\\n')")
    assert answer["error"] == "CompileError"
    assert "does not define a function 'nodef'" in answer["message"]
    assert a.ok("node.functions()") == []
    assert b.ok("node.functions()") == []


def test_raising_fn_stores_nothing_and_the_next_get_computes(cluster: Cluster) -> None:
    """fn raises: the caller sees it, nothing is stored, the next get computes."""
    cluster.start_loader()
    a, b = cluster.member("a"), cluster.member("b")
    answer = a.send("node.get('flaky', lambda: 1 / 0)")
    assert answer["error"] == "ZeroDivisionError"
    assert b.ok("node.keys()") == []
    assert b.ok("node.get('flaky', lambda: 'ok now')") == "ok now"
    assert a.ok("node.get('flaky')") == "ok now"


def test_wrong_cookie_is_refused_and_the_loader_keeps_serving(cluster: Cluster) -> None:
    """A wrong cookie gets AuthenticationError naming the loader; others are still served."""
    cluster.start_loader()
    good = cluster.member("good")
    cluster.env["CLUSTORAGE_COOKIE"] = "wrong"
    bad = cluster.member("bad")
    assert bad.started["error"] == "AuthenticationError"
    assert cluster.loader in bad.started["message"]
    assert good.ok("node.get('still', lambda: 'served')") == "served"
    assert "wrong cookie" in cluster.loader_log()


def test_duplicate_name_is_refused(cluster: Cluster) -> None:
    """A second live node with a taken name is refused, naming the clash."""
    cluster.start_loader()
    cluster.member("twin")
    second = cluster.member("twin")
    assert second.started["error"] == "NameClashError"
    assert "'twin' is already connected" in second.started["message"]


def test_wrong_loader_name_is_an_error(cluster: Cluster) -> None:
    """A loader answering with another name than --loader says is an error."""
    cluster.start_loader()
    wrong = cluster.member("m", loader=f"other@127.0.0.1:{cluster.port}")
    assert wrong.started["error"] == "ConfigError"
    assert "named 'app1', not 'other'" in wrong.started["message"]


def test_concurrent_threads_compute_once(home: Path) -> None:
    """Threads on two in-process nodes miss one key at once; fn runs once."""
    runs: list[int] = []
    gate = threading.Barrier(8)

    def fn() -> int:
        runs.append(1)
        return 7

    with node_pair() as (loader, member):
        results: list[int] = []

        def work(node: clustorage.Node) -> None:
            gate.wait()
            results.append(node.get("shared", fn))

        threads = [threading.Thread(target=work, args=((loader, member)[i % 2],)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert results == [7] * 8
    assert len(runs) == 1


def test_redefinition_replaces_everywhere_and_unchanged_source_keeps_version(home: Path) -> None:
    """A changed source makes version 2 everywhere; unchanged makes none unless define forces."""
    with node_pair() as (loader, member):
        assert member.define("f", "lambda: 1").version == 1
        again = loader.define("f", "lambda: 1", force=False)
        assert (again.version, again.changed) == (1, False)
        assert loader.define("f", "lambda: 2").version == 2
        assert member.call("f") == 2
        assert member.version("f") == 2
        forced = member.define("f", "lambda: 2")
        assert (forced.version, forced.changed) == (3, True)
        assert member.call("f", [], "lambda: 2") == 2
        assert loader.version("f") == 3


def test_traceback_shows_the_hot_loaded_source(home: Path) -> None:
    """A traceback through a hot-loaded function shows its source lines."""
    import traceback

    with node_pair() as (loader, member):
        loader.define("boom", "def boom(x):\n    return x / 0  # the culprit\n")
        with pytest.raises(ZeroDivisionError):
            member.call("boom", [1])
        try:
            member.call("boom", [1])
        except ZeroDivisionError:
            text = traceback.format_exc()
        assert '<cluster:boom>", line 2' in text
        assert "return x / 0  # the culprit" in text


def test_unpicklable_value_is_a_type_error_naming_the_key(home: Path) -> None:
    """A value cloudpickle cannot serialize raises TypeError naming the key; nothing stored."""
    with clustorage.Node("l", listen="127.0.0.1:0", data=":memory:", cookie=COOKIE) as loader:
        with pytest.raises(TypeError, match="'lock'"):
            loader.get("lock", threading.Lock)
        assert loader.keys() == []
        assert loader.get("lock", lambda: "fine") == "fine"


def test_on_load_listeners_hear_every_install(home: Path) -> None:
    """on_load callbacks fire for values and functions installed from elsewhere."""
    seen: list[tuple[str, str, int, str]] = []
    done = threading.Event()
    with node_pair() as (loader, member):

        def listen(event: clustorage.LoadEvent) -> None:
            seen.append((event.kind, event.key, event.version, event.origin))
            if event.key == "f":
                done.set()

        member.on_load(listen)
        loader.put("x", 1)
        loader.define("f", "lambda: 0")
        assert done.wait(10)
    assert ("value", "x", 1, "l") in seen
    assert ("function", "f", 1, "l") in seen


def test_a_value_larger_than_the_write_buffer_reaches_every_node(cluster: Cluster) -> None:
    """An 80 MB value (over the loader's 64 MiB per-peer backlog) reaches another member."""
    cluster.start_loader()
    a, b = cluster.member("a"), cluster.member("b")
    assert a.ok("node.put('big', b'x' * 80_000_000)") == 1
    assert b.ok("len(node.get('big'))") == 80_000_000
    assert a.ok("node.get('none', lambda: None) is None") is True
    assert b.ok("node.get('none') is None") is True


def test_idle_nodes_stop_polling(cluster: Cluster) -> None:
    """A member polls briefly for an answer after each exchange, and the loader for the
    next message after each request; then both sleep: idle, they use next to no CPU."""
    loader = psutil.Process(cluster.start_loader().pid)
    member = cluster.member("busy")
    member.ok("for i in range(300): node.get(f'k{i}', lambda: i)")
    loader_before = sum(loader.cpu_times()[:2])
    member_before = sum(psutil.Process(member.proc.pid).cpu_times()[:2])
    time.sleep(1.5)
    assert sum(loader.cpu_times()[:2]) - loader_before < 0.3
    assert sum(psutil.Process(member.proc.pid).cpu_times()[:2]) - member_before < 0.3


def test_a_blocking_call_from_a_members_listener_is_refused_not_hung() -> None:
    """A listener runs while the member applies a hot-load; a blocking call there would wait
    on itself, so it raises RuntimeError at once, and the member keeps working."""
    with node_pair() as (loader, member):
        seen: list[BaseException] = []
        done = threading.Event()

        def listener(event: object) -> None:
            try:
                member.get("other", lambda: 1)
            except BaseException as exc:
                seen.append(exc)
            done.set()

        member.on_load(listener)
        loader.put("pushed", 1)
        assert done.wait(10)
        assert isinstance(seen[0], RuntimeError) and "on_load" in str(seen[0])
        assert member.get("after", lambda: 2) == 2


def test_a_blocking_call_from_a_members_change_listener_is_refused_not_hung() -> None:
    """The same for on_change: a node joining is applied by the thread that would read the
    answer, so a blocking call from the listener raises at once."""
    with node_pair() as (_, member):
        seen: list[BaseException] = []
        done = threading.Event()

        def listener() -> None:
            if done.is_set():
                return
            try:
                member.put("from a listener", 1)
            except BaseException as exc:
                seen.append(exc)
            done.set()

        member.on_change(listener)
        with clustorage.Node("joiner", member.loader_address, cookie=COOKIE):
            assert done.wait(10)
        assert isinstance(seen[0], RuntimeError)
        assert member.get("after", lambda: 2) == 2


def test_a_put_during_a_lease_is_named_in_the_holders_lease_lost(cluster: Cluster) -> None:
    """Another node puts the key while its holder computes it: the holder's get raises
    LeaseLost saying who stored the value (it was not cut off), and the put's value stays."""
    cluster.start_loader()
    a, b = cluster.member("a"), cluster.member("b")
    started = cluster.tmp / "started"
    a.start_send(
        "import pathlib, time\n"
        f"def fn():\n    pathlib.Path({str(started)!r}).touch()\n    time.sleep(1.5)\n"
        "    return 'from a'\n"
        "node.get('k', fn)"
    )
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    b.ok("node.put('k', 'from b')")
    answer = a.answer()
    assert answer["error"] == "LeaseLost", answer
    assert "when b stored a value of it" in answer["message"], answer
    assert "cut off" not in answer["message"]
    assert a.ok("node.get('k')") == "from b"


def test_a_failed_fn_whose_lease_ended_does_not_release_another_threads_lease() -> None:
    """Thread 1 of m computes k; a put ends that lease and a delete follows; thread 2 of m
    computes k anew while w waits. Thread 1's fn then fails: that must not pass thread 2's
    lease to w (a Release names no token), so fn runs once and w gets thread 2's value."""
    first_go, second_go = threading.Event(), threading.Event()
    runs: list[str] = []
    results: dict[str, object] = {}

    def computing(loader: clustorage.Node) -> list[tuple[str, str, list[str]]]:
        leases = loader.status().get("cluster", {}).get("computing", [])
        return [(lease["key"], lease["holder"], lease["waiters"]) for lease in leases]

    def failing() -> str:
        first_go.wait(20)
        raise ValueError("thread 1's fn fails late")

    def second() -> str:
        runs.append("m")
        second_go.wait(20)
        return "from thread 2"

    def waiter_fn() -> str:
        runs.append("w")
        return "from w"

    def run(name: str, node: clustorage.Node, fn: object) -> None:
        try:
            results[name] = node.get("k", fn)  # type: ignore[arg-type]
        except Exception as exc:  # the test looks at what each got
            results[name] = exc

    with node_pair() as (loader, member):
        address = f"l@127.0.0.1:{loader.address[1]}"
        with clustorage.Node("w", address, cookie=COOKIE) as waiter:
            one = threading.Thread(target=run, args=("one", member, failing))
            one.start()
            wait_until(lambda: computing(loader) == [("k", "m", [])], 20, "thread 1 holds k")
            deleted = loader.put("k", "put") + 1
            loader.delete("k")
            tombstones = member._replica.tombstones
            wait_until(lambda: tombstones.get(("value", "k"), 0) >= deleted, 20, "m saw the delete")
            two = threading.Thread(target=run, args=("two", member, second))
            two.start()
            wait_until(lambda: runs == ["m"], 20, "thread 2 computes k")
            three = threading.Thread(target=run, args=("w", waiter, waiter_fn))
            three.start()
            wait_until(lambda: computing(loader) == [("k", "m", ["w"])], 20, "w waits for m")
            first_go.set()
            one.join(20)
            member.status()  # a round trip behind anything thread 1 sent
            assert computing(loader) == [("k", "m", ["w"])]
            second_go.set()
            two.join(20)
            three.join(20)
    assert isinstance(results["one"], ValueError)
    assert results["two"] == "from thread 2" and results["w"] == "from thread 2"
    assert runs == ["m"]


def replaced_connection(client: MemberClient) -> None:
    """Drop ``client``'s connection as its shared reader would on a reset, and wait until
    its connection thread made a new one (not resynced yet: that needs the io lock, which
    a caller may hold)."""
    old = client._sock
    client.ended(client._followed, OSError("cut"))
    wait_until(lambda: client._sock not in (None, old), 20, "a new connection")


@contextlib.contextmanager
def followed_member(cluster: Cluster) -> Iterator[tuple[clustorage.Node, MemberClient]]:
    """A loader, and an in-process member whose connection thread follows its connection."""
    cluster.start_loader()
    with clustorage.Node("m", cluster.loader, cookie=COOKIE) as node:
        client = node._channel
        wait_until(lambda: client._followed is client._sock is not None, 20, "connected")
        yield node, client


def reading_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """The main thread's next request finds another thread reading the connection (the
    shared reader, say): it sends, then waits for that thread to hand it its answer."""
    taking = MemberClient._take_io
    armed = [True]

    def take(self: MemberClient) -> bool:
        if armed and threading.current_thread() is threading.main_thread():
            armed.clear()
            return False
        return taking(self)

    monkeypatch.setattr(MemberClient, "_take_io", take)


def test_a_read_failing_late_on_a_dropped_connection_leaves_the_new_one(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller's read of a connection fails only after that connection was dropped and a
    new one made (a loaded machine: the caller was descheduled in between). Its failure is
    that of the old connection: the new one stays (it used to be dropped too, and with it a
    lease its node had just reclaimed on it, so that fn ran twice)."""
    with followed_member(cluster) as (node, client):
        reading = MemberClient._read_until
        armed = [True]

        def fails_late(self: MemberClient, *args: Any) -> float:
            if not armed or threading.current_thread() is not threading.main_thread():
                return reading(self, *args)
            armed.clear()
            replaced_connection(self)
            raise OSError("the read of the dropped connection failed")

        monkeypatch.setattr(MemberClient, "_read_until", fails_late)
        drops = client._drops
        while armed:  # the shared reader may read the answer: then the put is done
            with contextlib.suppress(clustorage.LoaderUnavailable):
                node.put("k", 1)
        assert client._drops == drops + 1  # the old connection only
        monkeypatch.undo()
        assert node.get("k", lambda: 0) in (0, 1)


def test_a_connection_replaced_as_a_failed_read_is_told_stays(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller's read fails on the connection, which is still the one it started on; the
    connection thread replaces it before the caller drops it. The drop is of that old one
    only: the check and the drop are one step."""
    with followed_member(cluster) as (node, client):
        reading, telling = MemberClient._read_until, MemberClient._say_lost
        armed = {"read": True, "tell": True}

        def fails(self: MemberClient, *args: Any) -> float:
            if not armed["read"] or threading.current_thread() is not threading.main_thread():
                return reading(self, *args)
            armed["read"] = False
            raise OSError("the read failed")

        def told(self: MemberClient, exc: BaseException) -> None:
            if armed["tell"] and threading.current_thread() is threading.main_thread():
                armed["tell"] = False
                replaced_connection(self)
            telling(self, exc)

        monkeypatch.setattr(MemberClient, "_read_until", fails)
        monkeypatch.setattr(MemberClient, "_say_lost", told)
        drops = client._drops
        while armed["read"]:  # the shared reader may read the answer: then the put is done
            with contextlib.suppress(clustorage.LoaderUnavailable):
                node.put("k", 1)
        assert not armed["tell"]
        assert client._drops == drops + 1  # the old connection only
        monkeypatch.undo()
        assert node.get("k", lambda: 0) in (0, 1)


def test_a_request_is_not_sent_on_a_connection_newer_than_its_number(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection is replaced between a get's numbering and its send: the get is not
    sent on the new connection before its resync (its answer, a lease, would reach nobody,
    and the next get would wait on that lease, its own node's, for ever). It asks again."""
    with followed_member(cluster) as (node, _):
        sending = MemberClient._send
        armed = [True]

        def replaced_first(self: MemberClient, message: Any, *args: Any) -> None:
            if armed and type(message) is Fetch:  # the get's
                armed.clear()
                replaced_connection(self)
            sending(self, message, *args)

        monkeypatch.setattr(MemberClient, "_send", replaced_first)
        got: list[object] = []
        getting = threading.Thread(target=lambda: got.append(node.get("k", lambda: 42)))
        getting.start()
        getting.join(30)
        assert got == [42], "the get did not return"
        assert not armed
        assert not node._asking  # the get numbered twice is done with both numbers


def test_a_request_numbered_while_disconnected_goes_once_connected(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection drops between a put's check that it is connected and its numbering:
    the put is not refused as "not connected", nor does its failure drop the next
    connection (a count taken while none is up is the next one's too): it goes out once
    the next connection is ready, which then stays."""
    with followed_member(cluster) as (node, client):
        connecting, numbering = MemberClient._connect_to, Pending.number
        waiting = MemberClient._wait_ready
        gate, armed = threading.Event(), [True]
        gate.set()
        drops = client._drops

        def gated(self: MemberClient, target: Any) -> None:
            gate.wait(20)
            connecting(self, target)

        def number(self: Pending) -> int:
            if armed and threading.current_thread() is threading.main_thread():
                armed.clear()
                gate.clear()  # the next connection waits until the put waits for it
                client.ended(client._followed, OSError("cut"))
                wait_until(lambda: client._drops != drops, 20, "dropped")
            return numbering(self)

        def wait_ready(self: MemberClient, timeout: float) -> None:
            gate.set()
            waiting(self, timeout)

        monkeypatch.setattr(MemberClient, "_connect_to", gated)
        monkeypatch.setattr(Pending, "number", number)
        monkeypatch.setattr(MemberClient, "_wait_ready", wait_ready)
        assert node.put("k", 1) == 1
        assert not armed
        assert client._drops == drops + 1


def test_a_request_numbered_before_the_new_connection_resynced_waits_for_it(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another thread reads; the connection is replaced between a put's wait for it and its
    numbering, and the new one's resync takes a while: the put goes out once it is done."""
    with followed_member(cluster) as (node, client):
        opening, armed = Pending.open, {"open": True}
        reading_elsewhere(monkeypatch)

        def open_(self: Pending, patient: bool = False) -> Any:
            if armed["open"] and threading.current_thread() is threading.main_thread():
                armed["open"] = False
                client._io_lock.acquire()  # the resync waits (a slow loader, say)
                replaced_connection(client)
                threading.Timer(0.5, client._io_lock.release).start()
            return opening(self, patient)

        monkeypatch.setattr(Pending, "open", open_)
        assert node.put("k", 1) == 1
        assert not any(armed.values())


def getting(
    node: clustorage.Node, key: str, fn: Callable[[], Any]
) -> tuple[threading.Thread, list[object]]:
    """A thread running ``node.get(key, fn)``, started; what it returned, or the Clustorage
    error it raised, once it ends."""
    ended: list[object] = []

    def get() -> None:
        try:
            ended.append(node.get(key, fn))
        except clustorage.ClustorageError as exc:
            ended.append(exc)

    thread = threading.Thread(target=get)
    thread.start()
    return thread, ended


@dataclass
class RestartUnderAHolder:
    """An in-process ``holder`` whose fn, computing "fresh", waits for ``go``; meanwhile
    the loader (durable) was killed and restarted, and ``other`` waits for "fresh". The
    holder's shared reader is ``stalled``, so that its node has not noticed (a SIGSTOP, or a
    busy machine): ``old`` is its dead connection. ``got``: what the holder's get returned
    or raised, once ``committing`` ends."""

    node: clustorage.Node
    client: MemberClient
    old: Any
    go: threading.Event
    stalled: threading.Event
    committing: threading.Thread
    got: list[object]
    other: Member
    runs: Path
    restart: Callable[[], None]  # kill -9 the loader, and start it again

    def let_fn_end(self) -> None:
        """Let ``fn`` return, and wait for the holder's get (and its commit) to end."""
        self.go.set()
        self.committing.join(60)
        self.stalled.clear()

    def check_computed_once(self) -> None:
        """The holder's value, everywhere, and fn ran on the holder only."""
        assert self.got == ["from holder"]
        assert self.other.answer() == {"ok": "from holder"}
        assert self.runs.read_text() == "holder\n"


@contextlib.contextmanager
def restart_under_a_holder(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RestartUnderAHolder]:
    data = str(tmp_path / "data")
    loaders = [cluster.start_loader(data=data)]
    other, watcher = cluster.member("other"), cluster.member("watcher")
    runs, go, stalled = tmp_path / "runs", threading.Event(), threading.Event()
    readable = MemberClient.readable

    def restart() -> None:
        os.kill(loaders[-1].pid, signal.SIGKILL)
        loaders[-1].wait(10)
        loaders.append(cluster.start_loader(data=data))

    def stalling(self: MemberClient, sock: Any, retry: bool) -> float | None:
        return LINGER if stalled.is_set() else readable(self, sock, retry)

    monkeypatch.setattr(MemberClient, "readable", stalling)
    with clustorage.Node("holder", cluster.loader, cookie=COOKIE) as node:
        client = node._channel

        def fn() -> str:
            runs.write_text("holder\n")
            go.wait(60)
            return "from holder"

        committing, got = getting(node, "fresh", fn)
        wait_until(lambda: computing_of(watcher) == [["fresh", "holder", []]], 20, "the lease")
        lease_written(data, "fresh")
        stalled.set()
        with client._io_lock:  # a read that began before is over
            pass
        restart()
        other.start_send(counted_fn(runs, "other", "from other") + "node.get('fresh', fn)")
        wait_until(
            lambda: computing_of(watcher) == [["fresh", "holder", ["other"]]], 30, "other waits"
        )
        try:
            yield RestartUnderAHolder(
                node, client, client._sock, go, stalled, committing, got, other, runs, restart
            )
        finally:
            go.set()
            committing.join(60)


def test_a_commit_on_a_dead_connection_leaves_the_next_ones_resync_alone(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loader restarts while ``fn`` runs, and the holder's commit is first to find the
    old connection dead: its thread drops it, and the connection thread makes a new one,
    which reclaims the lease, before that drop has failed the old connection's requests.
    The new connection's resync is not among them: it used to be failed too, the new
    connection closed, and the lease passed to the waiter, so that fn ran twice."""
    with restart_under_a_holder(cluster, tmp_path, monkeypatch) as scene:
        releasing, client, old = Connection.release, scene.client, [scene.old]

        def released(self: Connection) -> None:
            if old and threading.current_thread() is scene.committing:
                wait_until(lambda: client._sock not in (None, old[0]), 20, "a new connection")
                wait_until(client.pending.busy, 20, "its resync")
                old.clear()
            releasing(self)

        monkeypatch.setattr(Connection, "release", released)
        scene.let_fn_end()
        assert not old, "the commit did not drop the old connection"
        scene.check_computed_once()


def test_a_commit_whose_send_breaks_waits_for_the_next_connection(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loader restarts while ``fn`` runs; the holder's commit, which another thread's
    read leaves to wait for its answer, finds the old connection broken as it sends (an
    earlier send drew the reset). It drops that connection and goes out again on the next
    one, which reclaims the lease. It used to try the dead connection again at once, give
    up, and let the lease go unnamed by the next connection: fn ran twice."""
    with restart_under_a_holder(cluster, tmp_path, monkeypatch) as scene:
        sending, taking, read_by_another = MemberClient._send, MemberClient._take_io, [True]

        def send(self: MemberClient, message: Any, drops: int | None = None) -> None:
            if self._sock is scene.old:  # as the kernel says once the reset came back
                raise BrokenPipeError(32, "Broken pipe")
            sending(self, message, drops)

        def take(self: MemberClient) -> bool:
            if read_by_another and threading.current_thread() is scene.committing:
                read_by_another.clear()
                return False
            return taking(self)

        monkeypatch.setattr(MemberClient, "_send", send)
        monkeypatch.setattr(MemberClient, "_take_io", take)
        scene.let_fn_end()
        assert not read_by_another
        scene.check_computed_once()


def test_a_commit_cut_off_twice_waits_for_the_third_connection(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loader restarts while ``fn`` runs, and again as the holder's commit goes out on
    the next connection: the commit goes out once more, on the third, which reclaims the
    lease (it used to give up after one more try, and fn ran twice)."""
    with restart_under_a_holder(cluster, tmp_path, monkeypatch) as scene:
        sending, restarts = MemberClient._send, [scene.old]

        def send(self: MemberClient, message: Any, drops: int | None = None) -> None:
            if type(message) is Commit and self._sock not in restarts:
                restarts.append(self._sock)
                if len(restarts) == 2:
                    scene.restart()
            sending(self, message, drops)

        monkeypatch.setattr(MemberClient, "_send", send)
        scene.let_fn_end()
        assert len(restarts) == 3
        scene.check_computed_once()


def test_a_drop_leaves_the_membership_of_the_connection_made_since(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread that holds no read of the connection drops it (a send cut short, say), and
    the connection thread has a new one up and resynced before that drop is done: the
    node's members are the new connection's, not the nobody of a dropped one."""
    with followed_member(cluster) as (node, client):
        old, releasing = client._sock, Connection.release

        def released(self: Connection) -> None:
            if threading.current_thread() is threading.main_thread():
                wait_until(lambda: client._is_ready and client._sock is not old, 20, "resynced")
            releasing(self)

        monkeypatch.setattr(Connection, "release", released)
        client._drop("cut short", only=old)
        assert node.nodes() == ["app1", "m"]


def test_a_drop_of_no_connection_leaves_a_request_for_the_next_one(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller drops the connection (its read failed); a put numbered after that, while
    none is up, is meant for the next connection. The connection thread's own drop, of no
    connection, as it wakes, leaves the put's request alone: the put goes out on the next
    connection and returns (it used to fail, though the loader stored it)."""
    with followed_member(cluster) as (node, client):
        reading_elsewhere(monkeypatch)
        woken = threading.Event()
        armed = {"ready": True, "send": True, "woken": True}
        waiting, sending, dropping = (
            MemberClient._wait_ready,
            MemberClient._send,
            MemberClient._drop,
        )

        def drop(self: MemberClient, why: str, **only: Any) -> None:
            if armed["woken"] and threading.current_thread() is self._thread:
                armed["woken"] = False
                woken.wait(20)  # the connection thread's drop, of no connection, comes late
            dropping(self, why, **only)

        def ready(self: MemberClient, timeout: float) -> None:
            waiting(self, timeout)
            if armed["ready"] and threading.current_thread() is threading.main_thread():
                armed["ready"] = False
                self._drop("another caller's read failed", drops=self._drops)

        def send(self: MemberClient, message: Any, drops: int | None = None) -> None:
            if drops is not None and armed["send"]:
                armed["send"] = False
                assert self._sock is None  # numbered while none was up
                woken.set()
                wait_until(lambda: self._is_ready, 20, "the next connection")
            sending(self, message, drops)

        monkeypatch.setattr(MemberClient, "_drop", drop)
        monkeypatch.setattr(MemberClient, "_wait_ready", ready)
        monkeypatch.setattr(MemberClient, "_send", send)
        drops = client._drops
        assert node.put("k", 1) == 1
        monkeypatch.undo()
        assert not any(armed.values())
        assert client._drops == drops + 1


def test_a_request_numbered_as_its_connection_is_dropped_is_failed_or_sent_again(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put reads the drop count while another thread drops the connection, between the
    drop taking the requests open on it and moving the count on. The put is not both
    failed and sent on the next connection (it used to be: stored, yet its caller was told
    LoaderUnavailable); it goes out on the next connection and returns."""
    with followed_member(cluster) as (node, client):
        reading_elsewhere(monkeypatch)
        old = client._sock
        taking_all, opened = threading.Event(), threading.Event()
        armed = {"ready": True, "send": True}
        waiting, sending = MemberClient._wait_ready, MemberClient._send
        opening, taking = client.pending.open, client.pending.take_all

        def take_all() -> Any:
            if not taking_all.is_set():
                taking_all.set()
                opened.wait(20)
            return taking()

        def open_(patient: bool = False) -> Any:
            numbered = opening(patient)
            if threading.current_thread() is threading.main_thread():
                opened.set()
            return numbered

        def ready(self: MemberClient, timeout: float) -> None:
            waiting(self, timeout)
            if armed["ready"] and threading.current_thread() is threading.main_thread():
                armed["ready"] = False
                threading.Thread(target=client._drop, args=("cut",), kwargs={"only": old}).start()
                taking_all.wait(20)

        def send(self: MemberClient, message: Any, drops: int | None = None) -> None:
            if drops is not None and armed["send"]:
                armed["send"] = False
                wait_until(lambda: self._is_ready and self._sock not in (None, old), 20, "next")
            sending(self, message, drops)

        monkeypatch.setattr(client.pending, "open", open_)
        monkeypatch.setattr(client.pending, "take_all", take_all)
        monkeypatch.setattr(MemberClient, "_wait_ready", ready)
        monkeypatch.setattr(MemberClient, "_send", send)
        assert node.put("k", 1) == 1
        monkeypatch.undo()
        assert not any(armed.values())
        assert node.get("k", lambda: 0) == 1


def other_waits(holder: str, watcher: Member, other: Member, runs: Path) -> None:
    """Once ``holder`` holds the lease on "k", ``other`` asks for it (its fn would record
    its run in ``runs``) and waits."""
    wait_until(lambda: computing_of(watcher) == [["k", holder, []]], 20, "the lease")
    other.start_send(counted_fn(runs, "other", "from other") + "node.get('k', fn)")
    wait_until(lambda: computing_of(watcher) == [["k", holder, ["other"]]], 20, "waiting")


def test_a_drop_as_a_request_is_numbered_does_not_send_it_unheard(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another thread reads; the connection is replaced right after a put's waiter was
    opened (the drop fails that waiter): the put does not go out on the next connection with
    nobody to hear its answer (a user told it failed, while it was stored); it goes out
    anew, and returns its version."""
    with followed_member(cluster) as (node, client):
        opening, sending, armed = Pending.open, MemberClient._send, {"open": True}
        reading_elsewhere(monkeypatch)
        sent_on: list[int] = []

        def open_(self: Pending, patient: bool = False) -> Any:
            opened = opening(self, patient)
            if armed["open"] and threading.current_thread() is threading.main_thread():
                armed["open"] = False
                replaced_connection(client)
                wait_until(lambda: client._is_ready, 20, "connected again")
            return opened

        def send(self: MemberClient, message: Any, drops: int | None = None) -> None:
            sending(self, message, drops)
            if drops is not None:
                sent_on.append(drops)

        monkeypatch.setattr(Pending, "open", open_)
        monkeypatch.setattr(MemberClient, "_send", send)
        assert node.put("k", 1) == 1
        assert not any(armed.values())
        assert sent_on == [client._drops]  # once, numbered on the connection it went on


def test_a_read_after_the_end_of_a_connection_says_so_again(cluster: Cluster) -> None:
    """The loader's end of the connection is read once (by a caller, say, that then stepped
    aside): a later read of that connection says it ended too, instead of finding nothing
    to read and being asked again at once, for a second or so of spinning."""
    loader = cluster.start_loader()
    with clustorage.Node("m", cluster.loader, cookie=COOKIE) as node:
        client = node._channel
        with client._io_lock:  # nobody else reads it meanwhile
            loader.kill()
            loader.wait(10)
            with pytest.raises(_Lost):
                while True:
                    client._read_once(block=True)
            with pytest.raises(_Lost):
                client._read_once(block=True)


def test_a_connection_that_fails_its_resync_is_closed_before_the_next_address(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With two addresses listed, a connection that was made but failed its resync (its
    Sync could not be sent) is closed before the member tries the next address, not left
    open beside the next connection."""
    loader = cluster.start_loader()
    port = cluster.port
    sending = MemberClient._send
    failed: list[socket.socket] = []

    def sync_fails_once(self: MemberClient, message: Any, *args: Any) -> None:
        if not failed and type(message) is Sync:
            assert self._sock is not None
            failed.append(self._sock)
            raise OSError("the Sync could not be sent")
        sending(self, message, *args)

    monkeypatch.setattr(MemberClient, "_send", sync_fails_once)
    listed = f"app1@127.0.0.1:{port},localhost:{port}"
    with clustorage.Node("m", listed, cookie=COOKIE) as node:
        assert node.connected and failed
        assert failed[0].fileno() == -1, "the failed connection was left open"
        assert node._channel._sock is not failed[0]
    assert loader.poll() is None


def test_a_commit_that_a_stopped_loader_does_not_answer_is_sent_once_more(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that gets no answer in time on a connection still up (the loader stopped)
    is sent once more on it, not again and again until its patience runs out: only one cut
    off is sent on each next connection. Its value is stored once the loader goes on."""
    loader = cluster.start_loader()
    sending, commits = MemberClient._send, []

    def send(self: MemberClient, message: Any, drops: int | None = None) -> None:
        if type(message) is Commit:
            commits.append(self._sock)
        sending(self, message, drops)

    monkeypatch.setattr(MemberClient, "_send", send)
    leased, go = threading.Event(), threading.Event()
    with clustorage.Node("m", cluster.loader, cookie=COOKIE, timeout=1, dead_after=1) as node:

        def fn() -> str:
            leased.set()
            go.wait(30)
            return "v"

        def stop_the_loader() -> None:
            leased.wait(20)
            stop_process(loader.pid)
            go.set()

        stopping = threading.Thread(target=stop_the_loader)
        stopping.start()
        try:
            with pytest.raises(clustorage.LoaderUnavailable, match="no answer"):
                node.get("k", fn)
        finally:
            stopping.join(30)
            os.kill(loader.pid, signal.SIGCONT)
        assert len(commits) == 2 and commits[0] is commits[1]
        wait_until(lambda: node.version("k", "value") == 1, 20, "the value stored")


def test_a_request_that_times_out_on_a_slow_loader_keeps_the_connection(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loader that does not answer within the node's timeout (stopped here; busy or slow
    in life) fails that request only: the connection stays, with every lease on it (SPEC
    "Busy is not dead"), and the answer that comes later is applied all the same."""
    loader = cluster.start_loader()
    reading = MemberClient._request_reading
    read_by_caller: list[bool] = []

    def counted(self: MemberClient, *args: Any) -> Any:
        read_by_caller.append(True)
        return reading(self, *args)

    monkeypatch.setattr(MemberClient, "_request_reading", counted)
    with clustorage.Node("m", cluster.loader, cookie=COOKIE, timeout=1) as node:
        client = node._channel
        wait_until(lambda: client._followed is client._sock is not None, 20, "connected")
        drops, sock = client._drops, client._sock
        stop_process(loader.pid)
        try:
            read_by_caller.clear()
            with pytest.raises(clustorage.LoaderUnavailable, match="no answer"):
                node.put("k", b"x" * 100_000)
            assert read_by_caller, "the caller did not read its own answer"
            given_up = list(client._abandoned.values())
            assert [(type(m), m.payload) for m in given_up] == [(Put, b"")]  # not its bytes
        finally:
            os.kill(loader.pid, signal.SIGCONT)
        wait_until(lambda: node.version("k", "value") == 1, 20, "the late put applied")
        assert (client._drops, client._sock) == (drops, sock)


def cut_after_one_part(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next big frame sent is cut short by a Ctrl-C after its first part."""
    sending = Connection.send_message

    def cut(self: Connection, *args: Any) -> Iterator[Any]:
        parts = sending(self, *args)
        try:
            yield next(iter(parts))
            raise KeyboardInterrupt
        finally:
            if (close := getattr(parts, "close", None)) is not None:
                close()

    monkeypatch.setattr(Connection, "send_message", cut)


def test_a_ctrl_c_that_cuts_an_upload_short_keeps_another_threads_lease(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One thread computes a key that another node waits for, while Ctrl-C cuts the main
    thread's big put short: the connection is replaced, and the lease stays with the
    computing thread, whose value everyone gets (the loader used to see the connection
    close, take it for the node leaving, and pass the lease on: fn ran twice)."""
    cluster.start_loader()
    other, watcher = cluster.member("other"), cluster.member("watcher")
    runs, go = tmp_path / "runs", threading.Event()
    with clustorage.Node("m", cluster.loader, cookie=COOKIE) as node:

        def fn() -> str:
            runs.write_text("m\n")
            go.wait(60)
            return "from m"

        computing, got = getting(node, "k", fn)
        try:
            other_waits("m", watcher, other, runs)
            drops = node._channel._drops
            cut_after_one_part(monkeypatch)
            with pytest.raises(KeyboardInterrupt):
                node.put("big", b"x" * (1 << 20))
            monkeypatch.undo()
            assert node._channel._drops == drops + 1
        finally:
            go.set()
            computing.join(60)
        assert got == ["from m"]
    assert other.answer() == {"ok": "from m"}
    assert runs.read_text() == "m\n"


def test_a_node_that_cannot_reconnect_lets_its_leases_go_after_dead_after(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but no next connection is made (refused, say, while the old one is up):
    the dropped connection closes once ``dead_after`` has passed, and the lease passes to
    the waiting node, as it does for a host that stopped answering."""
    cluster.start_loader()
    other, watcher = cluster.member("other"), cluster.member("watcher")
    runs, go = tmp_path / "runs", threading.Event()
    with clustorage.Node("m", cluster.loader, cookie=COOKIE, dead_after=1) as node:

        def fn() -> str:
            go.wait(60)
            return "from m"

        computing, ended = getting(node, "k", fn)  # its lease passes on, or no loader
        try:
            other_waits("m", watcher, other, runs)

            def refused(self: MemberClient, target: Any) -> None:
                raise ConnectionRefusedError(111, "Connection refused")

            monkeypatch.setattr(MemberClient, "_connect_to", refused)
            cut_after_one_part(monkeypatch)
            with pytest.raises(KeyboardInterrupt):
                node.put("big", b"x" * (1 << 20))
            assert answer_within(other, 30) == {"ok": "from other"}
        finally:
            go.set()
            computing.join(60)
    assert runs.read_text() == "other\n"
    assert len(ended) == 1 and not isinstance(ended[0], str)


def test_a_node_stopped_after_a_cut_leaves_though_a_forked_child_holds_its_socket(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forked child (a worker pool started earlier, say) holds a copy of the node's
    socket; Ctrl-C cuts an upload short and the node stops before it reconnected. The
    connection kept for its leases is shut down as it closes, so the loader hears the node
    leave and the waiting node gets the lease (a close alone left it open in the child)."""
    cluster.start_loader()
    other, watcher = cluster.member("other"), cluster.member("watcher")
    runs, go = tmp_path / "runs", threading.Event()
    node = clustorage.Node("m", cluster.loader, cookie=COOKIE)

    def fn() -> str:
        go.wait(60)
        return "from m"

    computing, _ = getting(node, "k", fn)
    other_waits("m", watcher, other, runs)
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    try:

        def not_yet(self: MemberClient, target: Any) -> None:
            time.sleep(0.2)
            raise ConnectionRefusedError(111, "Connection refused")

        monkeypatch.setattr(MemberClient, "_connect_to", not_yet)
        cut_after_one_part(monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            node.put("big", b"x" * (1 << 20))
        node.stop()
        assert answer_within(other, 30) == {"ok": "from other"}
    finally:
        go.set()
        computing.join(30)
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_frame_cut_short_drops_its_own_connection_not_a_newer_one(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C cuts a big put's frame short, and the connection is replaced before the
    sender drops it (the shared reader saw a reset meanwhile): the sender's drop is of its
    own connection, which is gone already; the new one stays."""
    with followed_member(cluster) as (node, client):
        dropping = MemberClient._drop

        class Abandoned(dict[int, Any]):
            cleared = threading.Event()

            def clear(self) -> None:
                super().clear()
                self.cleared.set()

        def replaced_first(self: MemberClient, why: str, **only: Any) -> None:
            if "cut short" in why:
                replaced_connection(self)
                abandoned.cleared.wait(20)  # the new connection forgot the writes given up
            dropping(self, why, **only)

        client._abandoned = abandoned = Abandoned()
        cut_after_one_part(monkeypatch)
        monkeypatch.setattr(MemberClient, "_drop", replaced_first)
        drops = client._drops
        with pytest.raises(KeyboardInterrupt):
            node.put("big", b"x" * (1 << 20))
        monkeypatch.undo()
        assert client._drops == drops + 1  # the old connection only
        assert not abandoned, "a put cut short is waited for as if the loader had it"
        wait_until(lambda: client._is_ready, 20, "the new connection ready")
        assert node.put("k", 1) == 1


@pytest.mark.parametrize("reader", ["caller", "another thread"])
def test_a_send_that_fails_says_so_once(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    """A request whose send fails raises LoaderUnavailable naming the failure and how to
    start the loader once, not wrapped in a second such message."""
    with followed_member(cluster) as (node, _):
        if reader == "another thread":
            reading_elsewhere(monkeypatch)
        sending = MemberClient._send

        def fails(self: MemberClient, message: Any, drops: int | None = None) -> None:
            if drops is not None and threading.current_thread() is threading.main_thread():
                raise OSError("the send failed")
            sending(self, message, drops)

        monkeypatch.setattr(MemberClient, "_send", fails)
        with pytest.raises(clustorage.LoaderUnavailable) as failed:
            node.put("k", 1)
        assert "the send failed" in str(failed.value)
        assert str(failed.value).count("is unavailable") == 1, str(failed.value)


def test_a_ctrl_c_as_the_last_part_goes_out_keeps_the_connection(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C that comes while a big put's last part is sent cuts nothing short: the
    frame went out whole, so the connection stays and the put is stored; the Ctrl-C is
    raised as the node waits for the answer (applied when it comes) or once it came."""
    with followed_member(cluster) as (node, client):
        sending, sendall = Connection.send_message, socket.socket.sendall
        last: list[Any] = []

        def parts_noted(self: Connection, *args: Any) -> list[Any]:
            parts = list(sending(self, *args))
            last.append(parts[-1])
            return parts

        def ctrl_c_as_the_last_part_goes(self: socket.socket, data: Any, *args: Any) -> None:
            sendall(self, data, *args)
            if last and data is last[0]:
                last.clear()
                signal.raise_signal(signal.SIGINT)

        monkeypatch.setattr(Connection, "send_message", parts_noted)
        monkeypatch.setattr(socket.socket, "sendall", ctrl_c_as_the_last_part_goes)
        drops = client._drops
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with pytest.raises(KeyboardInterrupt):
                node.put("big", b"x" * (2 << 20))
        finally:
            signal.signal(signal.SIGINT, previous)
        monkeypatch.undo()
        assert node.version("big", "value") == 1
        assert client._drops == drops


def started(results: dict[str, Any], name: str, call: Callable[[], Any]) -> threading.Thread:
    """A thread running ``call``; its result, or what it raised, goes to ``results[name]``."""

    def run() -> None:
        try:
            results[name] = call()
        except Exception as exc:
            results[name] = exc

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread


def held_writes(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> tuple[threading.Event, threading.Event]:
    """The store's commits of ``key`` wait until the second event is set (a slow disk);
    the first is set as one begins."""
    writing, written = threading.Event(), threading.Event()
    committing = SQLiteStore.commit

    def slow(self: SQLiteStore, entry: Any, *args: Any) -> None:
        if entry.key == key:
            writing.set()
            written.wait(30)
        committing(self, entry, *args)

    monkeypatch.setattr(SQLiteStore, "commit", slow)
    return writing, written


@contextlib.contextmanager
def loader_and_member(tmp_path: Path) -> Iterator[tuple[clustorage.Node, clustorage.Node]]:
    """An in-process loader on a durable store (its own requests patient) and a member
    whose timeout is 1 s."""
    data = str(tmp_path / "data")
    with clustorage.Node(
        "app1", cookie=COOKIE, listen="127.0.0.1:0", data=data, timeout=60
    ) as loader:
        address = f"app1@127.0.0.1:{loader.address[1]}"
        with clustorage.Node("m", address, cookie=COOKIE, timeout=1) as member:
            yield loader, member


def test_requests_behind_a_slow_write_wait_for_it_past_their_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write of a key that takes longer than the node's timeout (a big value, a slow disk)
    delays the requests on that key, and only delays them (SPEC "The loader never stalls"):
    a get and a put of it wait, told to (by a Queued that names no leaseholder: a write
    is no lease), and end once it is written."""
    writing, written = held_writes(monkeypatch, "slow")
    with loader_and_member(tmp_path) as (loader, member):
        results: dict[str, Any] = {}
        writer = started(results, "writer", lambda: loader.put("slow", b"x" * (200 << 10)))
        assert writing.wait(20)
        getter = started(results, "get", lambda: member.get("slow"))
        wait_until(lambda: [w[:2] for w in member.waiting()] == [("slow", "")], 20, "told")
        putter = started(results, "put", lambda: member.put("slow", 2))
        wait_until(lambda: len(member._channel.pending.queued) == 2, 20, "both told")
        time.sleep(1.5)  # past the node's timeout (1 s): a stimulus, not a measurement
        assert list(results) == [], results
        written.set()
        writer.join(20)
        getter.join(20)
        putter.join(20)
        assert results["get"] == b"x" * (200 << 10), results
        assert results["put"] == 2, results
        assert member.get("slow") == 2


def test_a_big_put_whose_write_outlasts_the_timeout_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big put whose write takes longer than its node's timeout (a slow disk) is told
    to wait, and returns once the value is written, instead of failing while it is."""
    writing, written = held_writes(monkeypatch, "big")
    with loader_and_member(tmp_path) as (_, member):
        results: dict[str, Any] = {}
        putter = started(results, "put", lambda: member.put("big", b"x" * (200 << 10)))
        assert writing.wait(20)
        wait_until(lambda: len(member._channel.pending.queued) == 1, 20, "told to wait")
        time.sleep(1.5)  # past the node's timeout (1 s): a stimulus, not a measurement
        assert not results, results
        written.set()
        putter.join(20)
        assert results["put"] == 1, results
        assert member.get("big") == b"x" * (200 << 10)


def test_a_queued_for_a_write_given_up_is_not_taken_for_its_answer(cluster: Cluster) -> None:
    """A write whose caller gave up (Ctrl-C) waits for its late answer, to apply it: a
    Queued for it (the loader telling it to wait behind another write) is not that answer."""
    with followed_member(cluster) as (node, client):
        put = Put(999_999, "k", codec.dump("k", 1))
        client._abandoned[put.rid] = put
        client._dispatch(Queued(put.rid, "app1", 0.6))
        assert client._abandoned == {put.rid: put}
        assert node.version("k", "value") == 0
