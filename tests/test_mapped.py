"""A file mapped without a file descriptor: readable while any view of it lives, and never
unmapped under a thread still reading it, not even as the process exits."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from clustorage.mapped import map_read_only

pytestmark = pytest.mark.timeout(60)


def test_a_mapping_holds_no_descriptor_and_lives_as_long_as_its_views(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 5000)
    before = len(os.listdir("/proc/self/fd"))
    with open(path, "rb") as file:
        view = map_read_only(file.fileno(), 256 * 5000)
    assert len(os.listdir("/proc/self/fd")) == before
    assert (
        view.readonly
        and len(view) == 256 * 5000
        and bytes(view[250:260]) == bytes([250, 251, 252, 253, 254, 255, 0, 1, 2, 3])
    )
    owner = weakref.ref(view.obj)
    part = view[1000:1010]
    del view
    gc.collect()
    assert owner() is not None and bytes(part) == bytes(range(232, 242))
    del part
    gc.collect()
    assert owner() is None


READING_AT_EXIT = """
import hashlib, os, sys, threading, time
from clustorage.mapped import map_read_only
with open(sys.argv[1], "rb") as file:
    view = map_read_only(file.fileno(), os.fstat(file.fileno()).st_size)
def hash_forever():
    while True:
        hashlib.sha256(view).digest()  # without the GIL, as a loader's hashing thread does
for _ in range(2):
    threading.Thread(target=hash_forever, daemon=True).start()
time.sleep(0.05)
"""


def test_a_process_that_exits_while_a_thread_reads_a_mapping_exits_cleanly(
    tmp_path: Path,
) -> None:
    path = tmp_path / "blob"
    path.write_bytes(bytes(64 << 20))
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-c", READING_AT_EXIT, str(path)], capture_output=True, timeout=30
        )
        assert done.returncode == 0, done.stderr[-2000:]
