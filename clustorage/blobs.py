"""Big payloads as files beside the store, so that writing one holds up no other write.

A payload over ``FILE_THRESHOLD`` is written to a file of its own, then renamed into place,
before the store's row that names it commits: the row is the commit point, so a kill -9 at
any moment leaves either no row (and a stray file, swept at the next start) or a row and its
whole file (SPEC "Durability"). Like the store's WAL commits (``synchronous=NORMAL``), a file
is not fsync'd: a power cut may lose the latest writes. A file's name carries its size, so a
file cut short that way is told at the next start and its entry is left out, never read as
a shorter value. A file is read back mapped, not copied into memory. Files and their folder
are private to the user (0600 / 0700).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
from pathlib import Path

from .messages import Blob

__all__ = ["FILE_THRESHOLD", "BlobFiles"]

log = logging.getLogger(__name__)

FILE_THRESHOLD = 1 << 20  # bytes: a bigger payload gets a file of its own
_CHUNK = 1 << 24


class BlobFiles:
    """The folder of one store's big payloads."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)

    def write(self, payload: Blob) -> str:
        """Put ``payload`` in a new file; its name (for :meth:`read`).

        Raises:
            OSError: it could not be written (disk full...); nothing is left behind.
        """
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
