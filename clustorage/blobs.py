"""Big payloads as files beside the store, so that writing one holds up no other write.

A payload over ``FILE_THRESHOLD`` is written to a file of its own, then renamed into place,
before the store's row that names it commits: the row is the commit point, so a kill -9 at
any moment leaves either no row (and a stray file, swept at the next start) or a row and its
whole file (SPEC "Durability"). Like the store's WAL commits (``synchronous=NORMAL``), a file
is not fsync'd: a power cut may lose the latest writes. A file's name carries its size, so a
file cut short that way is told at the next start and its entry is left out, never read as
a shorter value. A file is read back mapped, not copied into memory, and holds no file
descriptor while mapped (clustorage.mapped). Files and their folder are private to the user
(0600 / 0700).

A big payload that arrives from a member is written to its new file while it arrives (an
:class:`ArrivingFile`, which the loader's connection hands to the frame); storing that
payload then renames the file into place instead of writing it again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import threading
from pathlib import Path

from .bulk import SPILLED
from .mapped import map_read_only
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
        if size <= FILE_THRESHOLD or not ArrivingFile.room():
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
        name, temporary, fd = _new_file(self.folder, len(view))
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
            return map_read_only(file.fileno(), size)

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


def _new_file(folder: Path, size: int) -> tuple[str, Path, int]:
    """A new private file in ``folder`` for a payload of ``size`` bytes, named as a write in
    progress (``NAME.partial``: swept at the next start if it is left): the name to rename
    it to, its path and its descriptor, open for writing."""
    name = f"{secrets.token_hex(16)}-{size}"
    path = folder / f"{name}.partial"
    return name, path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


class ArrivingFile:
    """The new file of a payload that is arriving (a :class:`clustorage.bulk.Spill`),
    named as :meth:`BlobFiles.write` names a file being written: a stray one (the loader
    killed meanwhile) is swept at the next start.

    A thread of its own writes the parts it is given, so that neither the frame's hashing
    thread nor the loop waits for the disk, and it alone removes the file: :meth:`discard`
    only tells it to. :meth:`place`, on the store's file lane, waits for the last write.
    Nothing raises: a failure (a full disk) only means the payload is written the usual
    way once it is stored. At most ``WRITERS`` are open at once (:meth:`BlobFiles.arriving`
    makes no more). In a forked child the file is its parent's, and left alone.
    """

    WRITERS = 8
    _open = 0
    _counting = threading.Lock()

    def __init__(self, folder: Path, size: int) -> None:
        self.name, self.path, self._fd = _new_file(folder, size)
        self._size = size
        self._pid = os.getpid()
        self._parts: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._lock = threading.RLock()  # brief holds only (re-entered by a finalizer in GC)
        self._failed = False
        self._discarded = False
        self._exited = False  # the thread is done: the file is closed, whole or removed
        self._gone = False  # removed, or renamed into place
        self._thread = threading.Thread(target=self._run, name="clustorage-arriving", daemon=True)
        with ArrivingFile._counting:
            ArrivingFile._open += 1
        try:
            self._thread.start()
        except RuntimeError:  # no thread to be had: no spill
            self._discarded = True
            self._ended()

    @classmethod
    def room(cls) -> bool:
        """Whether another may be made (fewer than WRITERS are open)."""
        return cls._open < cls.WRITERS

    def write(self, part: memoryview) -> None:
        if not (self._discarded or self._failed):
            self._parts.put(part)

    def finish(self) -> bool:
        """Wait for the last write; whether the file holds the whole payload."""
        if os.getpid() != self._pid:
            return False
        self._parts.put(None)
        if self._thread.is_alive():
            self._thread.join()
        return self._exited and not (self._failed or self._discarded)

    def discard(self) -> None:
        if os.getpid() != self._pid:
            return
        with self._lock:
            self._discarded = True
            exited = self._exited
        if exited:  # only after finish, on the file lane: the thread cannot remove it now
            self._remove()
        else:
            self._parts.put(None)

    def place(self, folder: Path) -> str:
        """Once every part is given: rename the whole file into ``folder``'s place for it; its
        name (for :meth:`BlobFiles.read`). Raises OSError (then discard it)."""
        if self.path.parent != folder or not self.finish():
            raise OSError(f"{self.path} is not a whole payload of {folder}")
        with self._lock:
            if self._gone or self._discarded:
                raise OSError(f"{self.path} was discarded")
            os.rename(self.path, folder / self.name)
            self._gone = True
        return self.name

    def _run(self) -> None:
        written = 0
        try:
            while (part := self._parts.get()) is not None:
                if not (self._failed or self._discarded):
                    try:
                        while part:
                            done = os.write(self._fd, part)
                            written += done
                            part = part[done:]
                    except OSError as exc:
                        log.info("stopped writing %s while it arrived: %s", self.path, exc)
                        self._failed = True
                        self._remove()  # now, not when the frame ends
                del part  # not kept while waiting: it holds the receive buffer
        finally:
            self._failed = self._failed or written != self._size
            self._ended()

    def _ended(self) -> None:
        """The thread's end (or a thread never had): close, and keep the file only if it is
        whole and wanted."""
        try:
            os.close(self._fd)
        except OSError as exc:  # a late write error (NFS): the payload is written when stored
            log.info("could not close %s: %s", self.path, exc)
            self._failed = True
        with self._lock:
            self._exited = True
            remove = self._failed or self._discarded
        with ArrivingFile._counting:
            ArrivingFile._open -= 1
        if remove:
            self._remove()

    def _remove(self) -> None:
        with self._lock:
            if self._gone:
                return
            self._gone = True
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove %s: %s", self.path, exc)
