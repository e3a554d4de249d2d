"""A big payload arriving at a loader is written to its file while it arrives: stored, that
file is renamed into place; a forged, cut-short or unstored one leaves no file behind; a
full disk falls back to writing it when stored (and refuses it then, saying why)."""

from __future__ import annotations

import gc
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import clustorage
from clustorage import codec
from clustorage.blobs import FILE_THRESHOLD, ArrivingFile, BlobFiles
from clustorage.bulk import SPILLED
from clustorage.errors import RemoteProtocolError
from clustorage.protocol import Frame, Role
from tests.conftest import COOKIE, Cluster
from tests.protocol_helpers import ConnectionPair, flip
from tests.test_bulk import eventually
from tests.test_hostile import authenticated

pytestmark = pytest.mark.timeout(90)

BLOB = os.urandom(2 * FILE_THRESHOLD + 12345)


@pytest.fixture(autouse=True)
def forgotten() -> Iterator[None]:
    """No spill of one test is left for the next."""
    yield
    for _ in range(2):  # push out whatever a test left
        SPILLED.remember(_Owner(), 0, _Nothing())
    SPILLED.sweep()


class _Owner:
    """A buffer that is gone at once."""


class _Nothing:
    def write(self, part: memoryview) -> None:
        pass

    def finish(self) -> bool:
        return True

    def discard(self) -> None:
        pass


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def swept(folder: Path) -> list[str]:
    """The folder's names after a sweep, as a loader's heartbeat makes one. A buffer may
    outlive its value a little: the file's writer holds the parts it has yet to write."""
    SPILLED.sweep()
    return names(folder)


def arrive(pair: ConnectionPair, blob: bytes, *, cut: int = 0, forge: bool = False) -> memoryview:
    """Send ``blob`` in a bulk frame from the client (its last ``cut`` bytes held back, or a
    byte of it flipped); the blob as the server received it."""
    data = b"".join(bytes(part) for part in pair.client.send_bulk(b"envelope", blob))
    if forge:
        data = flip(data, len(data) // 2)
    (frame,) = pair.deliver(Role.CLIENT, data[: len(data) - cut] if cut else data) or [None]
    assert isinstance(frame, Frame), frame
    payload = frame.payload
    assert isinstance(payload, memoryview)
    return payload[len(payload) - len(blob) :]


def loader_pair(folder: Path, **options: bytes) -> tuple[ConnectionPair, BlobFiles]:
    files = BlobFiles(folder)
    pair = ConnectionPair(max_frame=1 << 26, chunk=1 << 16, spiller=files.arriving, **options)
    pair.open()
    return pair, files


@pytest.mark.parametrize("tls", [False, True], ids=["tagged", "inside-tls"])
def test_a_stored_blob_is_the_file_written_while_it_arrived(tmp_path: Path, tls: bool) -> None:
    """The blob is in a file of the folder once its frame is in (a .partial one, as a write
    in progress is named); storing it renames that file, and it reads back whole."""
    options = {"binding": b"b" * 32} if tls else {}
    pair, files = loader_pair(tmp_path / "blobs", **options)
    blob = arrive(pair, BLOB)
    (partial,) = names(files.folder)
    assert partial.endswith(".partial")
    name = files.write(blob)
    assert names(files.folder) == [name] == [partial.removesuffix(".partial")]
    assert bytes(files.read(name)) == BLOB
    assert oct((files.folder / name).stat().st_mode & 0o777) == oct(0o600)


def test_a_forged_blob_leaves_no_file(tmp_path: Path) -> None:
    pair, files = loader_pair(tmp_path / "blobs")
    with pytest.raises(RemoteProtocolError):
        arrive(pair, BLOB, forge=True)
    eventually(lambda: names(files.folder) == [])


def test_a_frame_cut_short_leaves_no_file(tmp_path: Path) -> None:
    """The connection drops mid-frame (the loader then releases it): its file goes."""
    pair, files = loader_pair(tmp_path / "blobs")
    data = b"".join(bytes(part) for part in pair.client.send_bulk(b"envelope", BLOB))
    assert pair.deliver(Role.CLIENT, data[: len(data) // 2]) == []
    assert len(names(files.folder)) == 1
    pair.server.release()
    eventually(lambda: names(files.folder) == [])
    eventually(lambda: writers() == 0)


def test_a_blob_nobody_stores_loses_its_file(tmp_path: Path) -> None:
    """An arrived blob that is not stored (its request refused) loses its file once its
    buffer is gone; one that is stored keeps its file."""
    pair, files = loader_pair(tmp_path / "blobs")
    first = arrive(pair, BLOB)
    assert len(names(files.folder)) == 1
    name = files.write(arrive(pair, BLOB[::-1]))
    second = arrive(pair, BLOB)
    assert len(names(files.folder)) == 3
    del first, second
    gc.collect()
    eventually(lambda: swept(files.folder) == [name])
    eventually(lambda: writers() == 0)
    assert bytes(files.read(name)) == BLOB[::-1]


def test_a_loader_writes_so_many_blobs_at_once_and_stores_the_rest_after(
    tmp_path: Path,
) -> None:
    """Past ArrivingFile.WRITERS blobs arriving or waiting to be stored, the next one gets
    no file as it arrives: it is written when stored, as before."""
    pair, files = loader_pair(tmp_path / "blobs")
    waiting = [arrive(pair, BLOB) for _ in range(ArrivingFile.WRITERS)]
    assert len(names(files.folder)) == ArrivingFile.WRITERS
    extra = arrive(pair, BLOB[::-1])
    assert len(names(files.folder)) == ArrivingFile.WRITERS
    name = files.write(extra)
    assert bytes(files.read(name)) == BLOB[::-1]
    del waiting
    gc.collect()
    eventually(lambda: swept(files.folder) == [name])
    eventually(lambda: writers() == 0)


def writers() -> int:
    return sum(thread.name == "clustorage-arriving" for thread in threading.enumerate())


def test_a_full_disk_while_it_arrives_falls_back_to_writing_it_when_stored(
    tmp_path: Path,
) -> None:
    """Writing the arriving blob fails (here: a file size limit, as a full disk would): the
    frame is taken all the same and its file removed; storing it writes it then, and
    fails with the same error while the disk is still full, leaving nothing behind."""
    pair, files = loader_pair(tmp_path / "blobs")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_THRESHOLD, limits[1]))
    try:
        blob = arrive(pair, BLOB)
        eventually(lambda: names(files.folder) == [])
        with pytest.raises(OSError):
            files.write(blob)
        assert names(files.folder) == []
        data = b"".join(bytes(part) for part in pair.client.send_bulk(b"envelope", BLOB))
        pair.deliver(Role.CLIENT, data[: len(data) * 3 // 4])
        eventually(lambda: names(files.folder) == [])  # its write failed
        pair.server.release()  # and then its member left
        eventually(lambda: writers() == 0)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    name = files.write(blob)
    assert bytes(files.read(name)) == BLOB


FORKS = """
import os, sys
from pathlib import Path
from clustorage.blobs import BlobFiles
from clustorage.protocol import Frame, Role
from tests.protocol_helpers import ConnectionPair

blob = os.urandom(3 << 20)
files = BlobFiles(Path(sys.argv[1]))
pair = ConnectionPair(max_frame=1 << 26, chunk=1 << 16, spiller=files.arriving)
pair.open()
data = b"".join(bytes(part) for part in pair.client.send_bulk(b"envelope", blob))
pair.deliver(Role.CLIENT, data[: len(data) // 2])
child = os.fork()
if child == 0:
    sys.exit(0)  # a normal exit: the child's finalizers run
os.waitpid(child, 0)
(frame,) = pair.deliver(Role.CLIENT, data[len(data) // 2 :])
name = files.write(frame.payload[len(frame.payload) - len(blob) :])
assert bytes(files.read(name)) == blob
print(sorted(path.name for path in files.folder.iterdir()) == [name])
"""


def test_a_child_forked_meanwhile_leaves_the_file_alone(tmp_path: Path) -> None:
    """A process forks while a blob arrives, and the child exits: the file is the parent's,
    which stores it from that file."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", FORKS, str(tmp_path / "blobs")],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), *sys.path])),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr


def blob_folder(data: Path) -> Path:
    return data / "app1.sqlite3.blobs"


def test_a_big_put_stored_from_the_file_it_arrived_in_survives_kill_9(cluster: Cluster) -> None:
    """A real loader: the put's value is one file (nothing .partial left), byte for byte;
    after kill -9 and a restart on the same store, a new member gets it."""
    data = cluster.tmp / "data"
    loader = cluster.start_loader(data=str(data))
    value = os.urandom(12 << 20)
    with clustorage.Node("m", cluster.loader, cookie=COOKIE) as member:
        member.put("big", value)
    (name,) = names(blob_folder(data))
    assert not name.endswith(".partial")
    assert codec.load((blob_folder(data) / name).read_bytes()) == value
    loader.send_signal(signal.SIGKILL)
    loader.wait(10)
    cluster.start_loader(data=str(data))
    with clustorage.Node("late", cluster.loader, cookie=COOKIE) as late:
        assert late.get("big") == value


def test_a_member_gone_mid_put_leaves_no_file_on_the_loader(cluster: Cluster) -> None:
    """A member that leaves halfway through a big put: the loader removes the file it was
    writing that put to, and stores the next one."""
    data = cluster.tmp / "data"
    cluster.start_loader(data=str(data))
    sock, conn = authenticated(cluster.port, "gone")
    parts = b"".join(bytes(part) for part in conn.send_bulk(b"env", b"g" * (12 << 20)))
    sock.sendall(parts[: len(parts) // 2])
    eventually(lambda: len(names(blob_folder(data))) == 1)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    eventually(lambda: names(blob_folder(data)) == [])
    value = os.urandom(6 << 20)
    with clustorage.Node("m", cluster.loader, cookie=COOKIE) as member:
        member.put("next", value)
        assert member.get("next") == value
    assert len(names(blob_folder(data))) == 1
