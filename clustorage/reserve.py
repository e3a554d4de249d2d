"""Room kept aside on the store's disk, so that deletions can commit when it is full.

On a full disk SQLite cannot write even a deletion's tombstone, and a big value's file may go
only once its tombstone has committed (clustorage.blobs): without room set aside, nothing
could be deleted to make room. So the store keeps a file of ``SIZE`` bytes beside it,
allocated while there is room. A deletion that fails for want of space gives that room back
and is tried once more; a put never does, so the room is there for the deletions that let
writes resume. Before a put takes room, the file is made again if the disk has room for it.
A write that finds the disk full says how to make room (:func:`full_disk`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import StoreError

__all__ = ["FULL", "SIZE", "Reserve", "full_disk"]

log = logging.getLogger(__name__)

SIZE = 4 << 20  # bytes: a thousand pages of the WAL; a deletion takes a few
FULL = (errno.ENOSPC, errno.EDQUOT)  # what a write that found no room fails with
_CHUNK = 1 << 20


class Reserve:
    """The file at ``path`` that holds ``size`` bytes of the disk for deletions; the store's
    row writer and file writer may use it at once."""

    def __init__(self, path: Path, size: int = SIZE) -> None:
        self.path = path
        self.size = size
        self._lock = threading.Lock()
        self.held = self._allocated() >= size

    def _allocated(self) -> int:
        try:
            return os.stat(self.path).st_blocks * 512
        except OSError:
            return 0

    def make(self) -> bool:
        """Set the room aside unless it is already or the disk lacks it; whether it is held."""
        with self._lock:
            if self.held:
                return True
            try:
                disk = os.statvfs(self.path.parent)
                if disk.f_bavail * disk.f_frsize < self.size:
                    return False
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                try:
                    os.fchmod(fd, 0o600)  # whatever the umask
                    _allocate(fd, self.size)
                finally:
                    os.close(fd)
            except OSError as exc:
                log.debug("could not set %d bytes aside in %s: %s", self.size, self.path, exc)
                self._remove()
                return False
            self.held = True
            return True

    @contextlib.contextmanager
    def given_back(self) -> Iterator[bool]:
        """Give the room back to the disk; yields whether there was any to give. Until the
        block ends the room is its own: :meth:`make` waits."""
        with self._lock:
            freed = self._allocated() > 0
            self._remove()
            if freed:
                log.warning(
                    "the disk of %s is full: gave back the %d bytes kept aside for deletions",
                    self.path.parent,
                    self.size,
                )
            yield freed

    def _remove(self) -> None:
        self.held = False
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove %s: %s", self.path, exc)


def _allocate(fd: int, size: int) -> None:
    """Make the disk hold ``size`` bytes for file ``fd``: allocated, not a sparse hole (nor
    zeros that a compressing file system keeps in no room at all)."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
        return
    block = os.urandom(min(size, _CHUNK))
    written = 0
    while written < size:
        written += os.pwrite(fd, block[: size - written], written)


def full_disk(folder: Path, exc: BaseException, deleting: bool = False) -> StoreError:
    """What a write to the store in ``folder`` that found its disk full says: how to make
    room (``deleting``: for a deletion that found even the room kept for it spent)."""
    if deleting:
        return StoreError(
            f"the disk of the loader's data directory {folder} is full ({exc}), and the room "
            f"kept there for deletions is spent: nothing was deleted. Free space on that "
            f"disk, then delete again; writes then resume too"
        )
    return StoreError(
        f"the disk of the loader's data directory {folder} is full ({exc}): nothing was "
        f"stored. To make room, delete keys you no longer need with node.delete(key) or "
        f"%cluster_delete KEY (a deletion goes through even on a full disk, and frees its "
        f"value's space), or free space on that disk; writes then resume"
    )
