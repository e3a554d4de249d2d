"""The store on disk: private files whatever the umask, and one loader per store."""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cluster, free_port, kill, wait_for_port
from tests.test_hostile import start_loader_with

pytestmark = pytest.mark.timeout(90)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def loader(
    cluster: Cluster, data: str | None, port: int, log: str = "loader", **env: str
) -> subprocess.Popen[Any]:
    """A real ``clustorage loader`` started under umask 022 (``data`` None: the default)."""
    command = [sys.executable, "-m", "clustorage", "loader", "--name", "app1"]
    command += ["--listen", f"127.0.0.1:{port}"] + ([] if data is None else ["--data", data])
    with open(cluster.tmp / f"{log}.log", "a") as out:
        proc = subprocess.Popen(
            command,
            env=dict(cluster.env, **env),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.umask(0o022),
        )
    cluster.procs.append(proc)
    return proc


def started(
    cluster: Cluster, proc: subprocess.Popen[Any], port: int, log: str = "loader"
) -> subprocess.Popen[Any]:
    """Once the loader serves: its port accepts as soon as it listens, before its store is
    open, so wait for the line it logs once the store is open too."""
    deadline = time.monotonic() + 30
    wait_for_port(port, deadline, proc)
    path = cluster.tmp / f"{log}.log"
    while f"listening on 127.0.0.1:{port} with" not in path.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, path.read_text()
        time.sleep(0.05)
    cluster.port = port
    return proc


def test_everything_the_loader_makes_is_private_under_umask_022(cluster: Cluster) -> None:
    """Under umask 022 the home folder, the data folder, the cookie, the store, SQLite's
    -wal and -shm files and the room kept for deletions are created 0700 / 0600."""
    env = {k: v for k, v in cluster.env.items() if k != "CLUSTORAGE_COOKIE"}
    cluster.env = env  # the cookie file is made on first use, under the same umask
    port = free_port()
    started(cluster, loader(cluster, None, port), port)
    member = cluster.member("m")
    member.ok("node.put('secret', b'x' * 100_000)")
    member.ok("node.put('big secret', b'x' * 2_000_000)")  # a file of its own
    home = Path(env["HOME"]) / ".clustorage"
    data = home / "data"
    blobs = data / "app1.sqlite3.blobs"
    assert (mode(home), mode(data), mode(blobs)) == (0o700, 0o700, 0o700)
    files = sorted(path.name for path in data.iterdir())
    suffixes = ("", "-shm", "-wal", ".blobs", ".leases", ".lock", ".reserve")
    assert files == [f"app1.sqlite3{suffix}" for suffix in suffixes]
    (blob,) = blobs.iterdir()
    for path in [home / "cookie", *data.iterdir(), blob]:
        if path != blobs:
            assert mode(path) == 0o600, path


def test_a_data_folder_the_loader_makes_is_private(cluster: Cluster) -> None:
    """``--data`` naming folders that do not exist: each one made is 0700, the files 0600."""
    top = cluster.tmp / "made"
    port = free_port()
    started(cluster, loader(cluster, str(top / "deeper" / "data"), port), port)
    cluster.member("m").ok("node.put('k', 1)")
    for folder in (top, top / "deeper", top / "deeper" / "data"):
        assert mode(folder) == 0o700, folder
    for path in (top / "deeper" / "data").iterdir():
        assert mode(path) == (0o700 if path.is_dir() else 0o600), path


def test_a_store_folder_opened_by_its_user_gets_a_warning(cluster: Cluster) -> None:
    """A data folder the user made 0755 is used as it is, with one warning in the log."""
    shared = cluster.tmp / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    port = free_port()
    started(cluster, loader(cluster, str(shared), port), port)
    assert cluster.member("m").ok("node.put('k', 1)") == 1
    assert mode(shared) == 0o755
    log = (cluster.tmp / "loader.log").read_text()
    assert f"{shared} is open to group or others (mode 755)" in log
    assert mode(shared / "app1.sqlite3") == 0o600


def test_store_files_left_readable_are_made_private(cluster: Cluster) -> None:
    """A store an older version left 0644 is made 0600 when a loader opens it."""
    data = cluster.tmp / "old"
    data.mkdir(mode=0o700)
    (data / "app1.sqlite3").touch(mode=0o644)
    (data / "app1.sqlite3").chmod(0o644)
    port = free_port()
    started(cluster, loader(cluster, str(data), port), port)
    assert mode(data / "app1.sqlite3") == 0o600


def test_a_second_loader_on_one_store_exits_2_naming_the_first(cluster: Cluster) -> None:
    """Two loaders on one data file: the second exits 2 naming the file, the first's pid and
    address; the first goes on serving."""
    data = str(cluster.tmp / "data")
    first_port, second_port = free_port(), free_port()
    first = started(cluster, loader(cluster, data, first_port), first_port)
    member = cluster.member("m")
    member.ok("node.put('k', 'one')")
    second = loader(cluster, data, second_port, log="second")
    assert second.wait(30) == 2
    said = (cluster.tmp / "second.log").read_text()
    assert f"{data}/app1.sqlite3 is in use by another loader" in said
    assert f"pid {first.pid}, listening on 127.0.0.1:{first_port}" in said
    assert member.ok("node.put('k', 'two'); node.get('k')") == "two"


def test_the_lock_does_not_outlive_a_kill_9(cluster: Cluster) -> None:
    """A loader killed with kill -9 leaves no lock behind: a new one opens the store at once,
    with what the first acknowledged."""
    data = str(cluster.tmp / "data")
    port = free_port()
    first = started(cluster, loader(cluster, data, port), port)
    cluster.member("m").ok("node.put('kept', 42)")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    kill(first)
    second = started(cluster, loader(cluster, data, port, log="second"), port, log="second")
    assert second.poll() is None
    assert cluster.member("m2").ok("node.get('kept')") == 42


def test_more_big_values_than_file_descriptors_all_come_back(cluster: Cluster) -> None:
    """70 values in files of their own, and a loader restarted with 64 file descriptors:
    every value comes back, and the loader holds no descriptor per value."""
    count = 70
    data = str(cluster.tmp / "data")
    cluster.start_loader(data=data)
    writer = cluster.member("writer")
    writer.ok(
        f"for i in range({count}):\n    node.put(f'big{{i}}', i.to_bytes(2, 'big') * 550_000)"
    )
    first = cluster.procs[0]
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)

    def few_file_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    loader = start_loader_with(cluster, few_file_descriptors, data=data)
    reader = cluster.member("reader")
    assert reader.ok(
        f"all(node.get(f'big{{i}}') == i.to_bytes(2, 'big') * 550_000 for i in range({count}))"
    )
    assert len(os.listdir(f"/proc/{loader.pid}/fd")) < 40
    assert loader.poll() is None
    assert "left out" not in cluster.loader_log()


def test_a_value_whose_file_was_cut_short_is_gone_from_every_node(cluster: Cluster) -> None:
    """A big value's file cut short while the loader was down (a power cut): the loader
    leaves it out, and every node drops it, the one that had fetched it and the one that
    had only heard of it, so that the cluster agrees."""
    data = cluster.tmp / "data"
    first = cluster.start_loader(data=str(data))
    writer, fetched, heard = (cluster.member(name) for name in ("writer", "fetched", "heard"))
    writer.ok("node.put('big', b'y' * 3_000_000)")
    assert fetched.ok("len(node.get('big'))") == 3_000_000
    heard.ok(
        "import time\n"
        "deadline = time.monotonic() + 30\n"
        "while 'big' not in node.keys() and time.monotonic() < deadline: time.sleep(0.05)"
    )
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    (blob,) = (data / "app1.sqlite3.blobs").iterdir()
    os.truncate(blob, 100_000)
    cluster.start_loader(data=str(data))
    for member in (writer, fetched, heard):
        assert (
            member.ok(
                "import time\n"
                "deadline = time.monotonic() + 30\n"
                "while not node.connected and time.monotonic() < deadline: time.sleep(0.05)\n"
                "node.put(f'after-{node.name}', 1)\n"
                "'big' in node.keys()"
            )
            is False
        )
        answer = member.send("node.get('big')")
        assert "NotFound" in str(answer.get("error")), answer
    assert fetched.ok("node.get('big', lambda: 'again')") == "again"
    assert "left out value 'big' version 1" in cluster.loader_log()
