"""Big payloads as files beside the store, so that writing one holds up no other write.

A payload over ``FILE_THRESHOLD`` is written to a file of its own, then renamed into place,
before the store's row that names it commits: the row is the commit point, so a kill -9 at
any moment leaves either no row (and a stray file, swept at the next start) or a row and its
whole file (SPEC "Durability"). Like the store's WAL commits (``synchronous=NORMAL``), a file
is not fsync'd: a power cut may lose the latest writes. A file's name carries its size, so a
file cut short that way is told at the next start and its entry is left out, never read as
a shorter value. A file is read back mapped, not copied into memory. Files and their folder
are private to the user (0600 / 0700).

A big payload that arrives from a member is written to its new file while it arrives (an
:class:`ArrivingFile`, which the loader's connection hands to the frame, written by the
frame's hashing thread); storing that payload then renames the file into place instead of
writing it again.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
import threading
from pathlib import Path

from .bulk import SPILLED
from .messages import Blob

__all__ = ["FILE_THRESHOLD", "ArrivingFile", "BlobFiles"]

log = logging.getLogger(__name__)

FILE_THRESHOLD = 1 << 20  # bytes: a bigger payload gets a file of its own
_CHUNK = 1 << 24


class BlobFiles:
    """The folder of one store's big payloads."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)

    def arriving(self, size: int) -> ArrivingFile | None:
        """A new file for a payload of ``size`` bytes that is arriving, if a payload of that
        size gets a file; None if it does not, or the file cannot be made (the payload is
        then written once it is stored, or refused then, saying why)."""
        if size <= FILE_THRESHOLD:
            return None
        try:
            return ArrivingFile(self.folder, size)
        except OSError as exc:
            log.debug("no file for a payload arriving in %s: %s", self.folder, exc)
            return None

    def write(self, payload: Blob) -> str:
        """Put ``payload`` in a new file; its name (for :meth:`read`). A payload that was
        written to a file of this folder while it arrived is not written again: that file
        is renamed into place.

        Raises:
            OSError: it could not be written (disk full...); nothing is left behind.
        """
        spill = SPILLED.take(payload)
        if isinstance(spill, ArrivingFile):
            try:
                return spill.place(self.folder)
            except OSError as exc:  # another folder, or gone: write it after all
                log.debug("could not place an arrived payload's file: %s", exc)
        if spill is not None:
            spill.discard()
        view = memoryview(payload).cast("B")
        name = f"{secrets.token_hex(16)}-{len(view)}"
        temporary = self.folder / f"{name}.partial"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for start in range(0, len(view), _CHUNK):
                chunk = view[start : start + _CHUNK]
                while chunk:
                    chunk = chunk[os.write(fd, chunk) :]
        except BaseException:
            os.close(fd)
            temporary.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.rename(temporary, self.folder / name)
        return name

    def read(self, name: str) -> Blob:
        """The payload in file ``name``, mapped read-only.

        Raises:
            OSError: the file is missing, or shorter or longer than what was written.
        """
        expected = int(name.rpartition("-")[2]) if "-" in name else None
        with open(self.folder / name, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if expected is not None and size != expected:
                raise OSError(f"{self.folder / name} has {size} bytes, not the {expected} written")
            if size == 0:
                return b""
            return memoryview(mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ))

    def remove(self, name: str) -> None:
        """Delete file ``name`` (a mapping of it stays readable until it is dropped)."""
        with contextlib.suppress(FileNotFoundError):
            (self.folder / name).unlink()

    def sweep(self, keep: set[str]) -> None:
        """Delete every file no row names (left by a write cut short)."""
        for path in self.folder.iterdir():
            if path.name not in keep:
                log.info("removing %s: no stored entry names it", path)
                with contextlib.suppress(OSError):
                    path.unlink()


class ArrivingFile:
    """The new file of a payload that is arriving (a :class:`clustorage.bulk.Spill`),
    named as :meth:`BlobFiles.write` names a file being written: a stray one (the loader
    killed meanwhile) is swept at the next start.

    Written from the frame's hashing thread; the loop thread may discard it meanwhile (the
    connection dropped), hence the lock.
    """

    def __init__(self, folder: Path, size: int) -> None:
        self.name = f"{secrets.token_hex(16)}-{size}"
        self.path = folder / f"{self.name}.partial"
        self._size = size
        self._lock = threading.Lock()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._whole = False
        self._gone = False

    def write(self, part: memoryview) -> None:
        with self._lock:
            if self._fd is None:
                return
            try:
                while part:
                    part = part[os.write(self._fd, part) :]
            except OSError as exc:  # a full disk: the payload is written when stored, or refused
                log.info("stopped writing %s while it arrived: %s", self.path, exc)
                self._close_and_remove()

    def finish(self) -> bool:
        with self._lock:
            if self._fd is None:
                return False
            os.close(self._fd)
            self._fd = None
            self._whole = os.stat(self.path).st_size == self._size
            return self._whole

    def discard(self) -> None:
        with self._lock:
            self._close_and_remove()

    def place(self, folder: Path) -> str:
        """Rename the whole file into ``folder``'s place for it; its name (for
        :meth:`BlobFiles.read`). Raises OSError (then discard it)."""
        with self._lock:
            if not self._whole or self._gone or self.path.parent != folder:
                raise OSError(f"{self.path} is not a whole payload of {folder}")
            os.rename(self.path, folder / self.name)
            self._gone = True  # renamed: nothing left to remove
            return self.name

    def _close_and_remove(self) -> None:
        """(The lock held.)"""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self._gone:
            self._gone = True
            self.path.unlink(missing_ok=True)
