"""One loader per store: an advisory lock on a file beside the store (SPEC "Durability").

The lock is ``flock`` on ``DATA.lock``: the kernel releases it when its holder's last file
descriptor closes, so it never outlives the holder, ``kill -9`` included. The file says who
holds it (pid, address), so that a second loader can name the first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import weakref
from pathlib import Path

from .config import private_file
from .errors import StoreError

__all__ = ["StoreLock"]


class StoreLock:
    """The lock of the store at ``data``, held from construction until :meth:`release`.

    Raises:
        StoreError: another process holds it; the message names the file and the holder.
    """

    def __init__(self, data: str) -> None:
        self.data = data
        self.path = Path(f"{data}.lock")
        private_file(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"the data file {data} is in use by another loader ({self._holder()}); "
                f"stop that loader first, or give this one another --data DIR"
            ) from None
        except OSError:
            os.close(fd)
            raise
        self._fd: int | None = fd
        # Released with the object too, so a loader that failed to start does not keep it.
        self._close = weakref.finalize(self, os.close, fd)
        try:
            self.announce("")
        except BaseException:  # released now, not when the error's traceback is dropped
            self.release()
            raise

    def _holder(self) -> str:
        try:
            holder = json.loads(self.path.read_text())
            pid, address = int(holder["pid"]), str(holder.get("address") or "")
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not said who it is yet"
        return f"pid {pid}, listening on {address}" if address else f"pid {pid}, starting"

    def announce(self, address: str) -> None:
        """Record this process, listening on ``address``, as the holder."""
        if self._fd is None:
            return
        text = json.dumps({"pid": os.getpid(), "address": address}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text, 0)

    def release(self) -> None:
        """Let another loader have the store (closing the file releases the lock)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            self._fd = None
            self._close()
