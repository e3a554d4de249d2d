"""Room kept aside on the store's disk, so that deletions can commit when it is full.

On a full disk SQLite cannot write even a deletion's tombstone, and a big value's file may go
only once its tombstone has committed (clustorage.blobs): without room set aside, nothing
could be deleted to make room. So the store keeps a file beside it, allocated while there is
room: ``SIZE`` bytes, or a ``SHARE``-th of a smaller disk, so that a disk of a few MiB still
takes puts. A deletion that fails for want of space gives that room back and is tried once
more, and so is opening the store (a loader started again on a full disk can then delete).
A put never takes it: before one, the file is made again if it is missing and the disk has
room for it, and while it cannot be, puts are refused as if the disk were full, so that the
room stays for the deletions that let writes resume. A put looks at the file itself at most
every ``LOOK_EVERY`` seconds (a system call costs more than the rest of the check): a file
removed or replaced by hand is noticed within that time. A write that finds the disk full
says how to make room (:func:`full_disk`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import StoreError

__all__ = ["FULL", "LOOK_EVERY", "SHARE", "SIZE", "Reserve", "full_disk"]

log = logging.getLogger(__name__)

SIZE = 4 << 20  # bytes: a thousand pages of the WAL; a deletion takes a few
SHARE = 16  # the most of a disk set aside is its SHARE-th
LOOK_EVERY = 1.0  # seconds
FULL = (errno.ENOSPC, errno.EDQUOT)  # what a write that found no room fails with
_PAGE = 4096
_CHUNK = 1 << 20


def _size_for(folder: Path) -> int:
    """How many bytes to set aside on the disk of ``folder``."""
    try:
        disk = os.statvfs(folder)
    except OSError:
        return SIZE
    share = disk.f_blocks * disk.f_frsize // SHARE
    if not share:  # a file system that does not say its size
        return SIZE
    return max(_PAGE, min(SIZE, share - share % _PAGE))


class Reserve:
    """The file at ``path`` that holds ``size`` bytes of the disk for deletions; the store's
    row writer and file writer may use it at once.

    ``held`` says whether it did when last looked at; ``error`` why it could not be made,
    when that was not for want of room.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = _size_for(path.parent)
        self.error: OSError | None = None
        self._lock = threading.Lock()
        self.held = self._allocated() >= self.size
        self._look_at = time.monotonic() + LOOK_EVERY

    def _allocated(self) -> int:
        """The bytes the file holds: none unless it is a regular file (not followed)."""
        try:
            found = os.lstat(self.path)
        except OSError:
            return 0
        return found.st_blocks * 512 if stat.S_ISREG(found.st_mode) else 0

    def hold(self) -> bool:
        """Whether the room is held, set aside again first if it was not and the disk has
        room for it now: before a put, which may take room only if so."""
        if self.held and time.monotonic() < self._look_at:
            return True
        return self.make()

    def make(self) -> bool:
        """Set the room aside unless it is already or the disk lacks it; whether it is held."""
        with self._lock:
            if self._allocated() < self.size:
                if self.held:
                    log.warning(
                        "%s was removed or changed: setting aside its room again", self.path
                    )
                self.held = False
                if not self._create():
                    return False
            self.held = True
            self.error = None
            self._look_at = time.monotonic() + LOOK_EVERY
            return True

    def _create(self) -> bool:
        """Make the file anew, if the disk has room for it; whether it did."""
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # a link is replaced, not followed; a short file remade
            disk = os.statvfs(self.path.parent)
            if disk.f_bavail * disk.f_frsize < self.size:
                self.error = None
                return False
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.fchmod(fd, 0o600)  # whatever the umask
                _allocate(fd, self.size)
            finally:
                os.close(fd)
        except OSError as exc:
            log.debug("could not set %d bytes aside in %s: %s", self.size, self.path, exc)
            self.error = None if exc.errno in FULL else exc
            self._remove()
            return False
        return True

    def refusal(self) -> StoreError:
        """What a put refused because the room cannot be set aside says: the disk lacks it
        (the put would take what the next deletion needs), or the file cannot be made."""
        if self.error is None:
            why = f"less than the {self.size} bytes it keeps for deletions are free"
            return full_disk(self.path.parent, why)
        return StoreError(
            f"the loader could not set aside room for deletions in {self.path} "
            f"({self.error}): nothing was stored"
        )

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


def full_disk(folder: Path, why: object, deleting: bool = False) -> StoreError:
    """What a write to the store in ``folder`` that found its disk full (``why``) says: how
    to make room (``deleting``: for a deletion that found even the room kept for it spent)."""
    if deleting:
        return StoreError(
            f"the disk of the loader's data directory {folder} is full ({why}), and the room "
            f"kept there for deletions is spent: nothing was deleted. Free space on that "
            f"disk, then delete again; writes then resume too"
        )
    return StoreError(
        f"the disk of the loader's data directory {folder} is full ({why}): nothing was "
        f"stored. To make room, delete keys you no longer need with node.delete(key) or "
        f"%cluster_delete KEY (a deletion goes through even on a full disk, and frees its "
        f"value's space), or free space on that disk; writes then resume"
    )
