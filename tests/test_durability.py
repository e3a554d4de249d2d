"""Durability and faults: kill -9 of the loader and of a leaseholder, reconnection, store errors."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

import clustorage
from tests.conftest import COOKIE, LOADER, Cluster, node_pair
from tests.disk_helpers import small_disk

pytestmark = pytest.mark.timeout(120)

BURST = (
    "import threading, clustorage\n"
    "acked = []\n"
    "def burst():\n"
    "    for i in range(500, 100000):\n"
    "        try:\n"
    "            if i % 10 == 0:\n"
    "                d = node.define(f'f{i}', f'lambda: {i}')\n"
    "                acked.append(('function', f'f{i}', d.version, i))\n"
    "            else:\n"
    "                v = node.put(f'k{i}', {'i': i})\n"
    "                acked.append(('value', f'k{i}', v, i))\n"
    "        except clustorage.LoaderUnavailable:\n"
    "            return\n"
    "writer = threading.Thread(target=burst)\n"
    "writer.start()\n"
)


def wait_until(member_ok: object, deadline: float) -> None:
    """Poll until ``member_ok()`` is true or ``deadline`` (monotonic) passes."""
    while time.monotonic() < deadline:
        if member_ok():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_kill_9_loses_no_acknowledged_entry(cluster: Cluster, tmp_path: Path) -> None:
    """kill -9 during a burst: after restart every acknowledged entry is there, same version."""
    data = str(tmp_path / "data")
    loader = cluster.start_loader(data=data)
    writer = cluster.member("writer")
    assert writer.ok("for i in range(500): node.put(f'k{i}', {'i': i})\nlen(node.keys())") == 500
    writer.ok(BURST)
    time.sleep(random.uniform(0.2, 0.8))
    os.kill(loader.pid, signal.SIGKILL)
    loader.wait(10)
    writer.ok("writer.join(30)")
    acked = writer.ok("acked")
    assert acked, "the burst acknowledged nothing before the kill"

    cluster.start_loader(data=data)
    wait_until(lambda: writer.ok("node.connected"), time.monotonic() + 30)
    checker = cluster.member("checker")
    for i in range(500):
        assert checker.ok(f"node.get('k{i}')") == {"i": i}
    lost = checker.ok(
        f"acked = {acked!r}\n"
        "[a for a in acked if node.version(a[1], a[0]) != a[2] or "
        "(node.get(a[1]) if a[0] == 'value' else node.call(a[1])) not in ({'i': a[3]}, a[3])]"
    )
    assert lost == []
    assert writer.ok("node.get('after-restart', lambda: 'computed again')") == "computed again"


def test_member_killed_mid_fn_does_not_block_waiters(cluster: Cluster, tmp_path: Path) -> None:
    """The leaseholder dies with kill -9 mid-fn; a waiter gets the lease and computes."""
    cluster.start_loader()
    started = tmp_path / "started"
    holder, waiter = cluster.member("holder"), cluster.member("waiter")
    holder.start_send(
        "import time, pathlib\n"
        f"def fn():\n    pathlib.Path({str(started)!r}).touch()\n    time.sleep(60)\n"
        "node.get('slow', fn)"
    )
    wait_until(started.exists, time.monotonic() + 20)
    waiter.start_send("node.get('slow', lambda: 'from waiter')")
    time.sleep(0.3)
    os.kill(holder.proc.pid, signal.SIGKILL)
    assert waiter.answer() == {"ok": "from waiter"}


def test_member_reconnects_and_resyncs_after_loader_restart(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A member resyncs by versions after a restart: it gets what changed while it was away."""
    data = str(tmp_path / "data")
    loader = cluster.start_loader(data=data)
    a = cluster.member("a")
    a.ok("node.put('x', 1)")
    os.kill(loader.pid, signal.SIGKILL)
    loader.wait(10)
    assert a.ok("node.get('x')") == 1
    answer = a.send("node.get('missing', lambda: 0)")
    assert answer["error"] == "LoaderUnavailable"
    assert "clustorage loader --name app1" in answer["message"]
    cluster.start_loader(data=data)
    b = cluster.member("b")
    b.ok("node.put('x', 2)\nnode.define('f', 'lambda: 3')")
    wait_until(lambda: a.ok("node.connected"), time.monotonic() + 30)
    wait_until(lambda: a.ok("node.get('x')") == 2, time.monotonic() + 10)
    assert a.ok("node.call('f')") == 3


def test_a_member_resyncs_in_full_with_a_loader_on_another_store(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Each store numbers its versions afresh: a member that reconnects to a loader on
    another store (one that kept nothing, or another data file) takes that store's values,
    even under a version number it held, and drops the keys that store has not got."""
    data = str(tmp_path / "other-store")
    with clustorage.Node("app1", listen="127.0.0.1:0", data=data, cookie=COOKIE) as other:
        assert other.put("k", "from the other store") == 1
    loader = cluster.start_loader()
    a = cluster.member("a")
    assert a.ok("node.put('k', 'old')") == 1
    a.ok("node.put('gone', 'with the old loader')")
    os.kill(loader.pid, signal.SIGKILL)
    loader.wait(10)
    cluster.start_loader(data=data)
    a.ok(
        "import time\n"
        "deadline = time.monotonic() + 20\n"
        "while 'gone' in node.keys() and time.monotonic() < deadline: time.sleep(0.05)"
    )
    assert a.ok("node.keys()") == ["k"]
    assert a.ok("node.get('k')") == "from the other store"


def test_history_records_every_version(home: Path, tmp_path: Path) -> None:
    """Every function version is auditable, with its source and defining node."""
    with node_pair(data=str(tmp_path / "data")) as (loader, member):
        member.define("f", "lambda: 1")
        loader.define("f", "lambda: 2")
        member.delete("f", kind="function")
        history = loader.history("f")
    assert [entry.version for entry in history] == [1, 2, 3]
    assert [entry.origin for entry in history] == ["m", "l", "m"]
    assert history[0].source == "lambda: 1"
    assert history[2].source is None


def test_restart_keeps_versions(home: Path, tmp_path: Path) -> None:
    """A loader restarted on the same data has every entry at its version."""
    data = str(tmp_path / "data")
    with clustorage.Node("l", listen="127.0.0.1:0", data=data, cookie=COOKIE) as node:
        node.put("a", 1)
        node.put("a", 2)
        node.define("f", "lambda: 'v1'")
        node.define("f", "lambda: 'v2'")
    with clustorage.Node("l", listen="127.0.0.1:0", data=data, cookie=COOKIE) as node:
        assert (node.get("a"), node.version("a", "value")) == (2, 2)
        assert (node.call("f"), node.version("f")) == ("v2", 2)
        node.put("a", 3)
        assert node.version("a", "value") == 3


def test_unwritable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    """A loader whose data directory cannot be written exits 2 with a clear message."""
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    env = dict(os.environ, HOME=str(tmp_path), CLUSTORAGE_COOKIE=COOKIE)
    result = subprocess.run(
        [*LOADER, "--name", "l", "--listen", "127.0.0.1:0", "--data", str(blocked / "sub")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "cannot open the loader's data file" in result.stderr
    assert "--data DIR" in result.stderr


def test_full_disk_fails_the_write_and_loses_nothing(home: Path, tmp_path: Path) -> None:
    """A full disk fails the write clearly; old entries stay; writes resume once space is freed."""
    with small_disk(tmp_path / "small", "2m") as mount:
        filler = mount / "filler"
        filler.write_bytes(b"\0" * 600_000)
        with clustorage.Node("l", listen="127.0.0.1:0", data=str(mount), cookie=COOKIE) as node:
            node.put("small", "kept")
            with pytest.raises(clustorage.StoreError, match="full"):
                for i in range(100):
                    node.put(f"big{i}", os.urandom(300_000))
            assert node.get("small") == "kept"
            filler.unlink()  # the user frees some space
            assert node.get("after", lambda: "still works") == "still works"


def test_value_over_the_frame_limit_names_the_limit(home: Path) -> None:
    """A value larger than the frame limit is refused, naming the limit and how to raise it."""
    with clustorage.Node(
        "l", listen="127.0.0.1:0", data=":memory:", cookie=COOKIE, max_frame=100_000
    ) as node:
        with pytest.raises(clustorage.ValueTooLarge, match="CLUSTORAGE_MAX_FRAME"):
            node.get("big", lambda: b"x" * 200_000)
        assert node.keys() == []
        assert node.get("big", lambda: b"small") == b"small"
