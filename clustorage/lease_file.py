"""Where a loader on a SQLite store keeps its compute leases, so that it finds them again
after a restart (a kill -9 included) and keeps each key for its holder, who may still be
computing it, instead of granting it to the next get (SPEC "get" 3: fn runs once).

The leases are a loader's working state, not data: each grant is a line appended to a file
beside the store, written a moment after the request was answered (``later``: at most one
``write`` per WRITE_AFTER, no waiting for the disk, so a lease costs the miss no commit and
its holder does not wait for the write). A lease that ends before its line is written (a
quick fn, the common case) writes nothing at all; a kill -9 loses the grants of that last
moment, as it would any lease granted just before it. Each end of a lease whose grant was
written is a line that goes with the next write: a crash may lose the last few ends (such a
lease's key got its value, which a restarted loader sees; or its holder comes back without
it; or the lease waits out its grace). The file is rewritten with only the leases still held
once it has grown. A line cut short by a crash, or one that is not a lease, is passed over
when the file is read.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from .config import private_file

__all__ = ["LeaseFile"]

log = logging.getLogger(__name__)

REWRITE_AT = 1 << 20  # bytes appended before the file is rewritten with the leases held
# Seconds from a grant to its line's write: a trivial fn's lease (a fetch, fn, the commit,
# well under a millisecond) ends before it and costs the loader no write (bench/README.md).
WRITE_AFTER = 0.002
_ENCODER = json.JSONEncoder(ensure_ascii=False)


class LeaseFile:
    """A :class:`clustorage.loader.LeaseBook` in the file at ``path``."""

    ends_with_value = False  # a value stored does not end its lease's record here

    def __init__(self, path: Path, later: Callable[[Callable[[], None]], object]) -> None:
        self.path = path
        self._later = later
        self._held = _read(path)
        self._fd = -1
        self._appended = 0  # bytes appended since the file was last written anew
        self._unwritten: list[list[object]] = []  # ends of leases whose grant was written
        self._granted: dict[str, tuple[str, int]] = {}  # grants not written yet
        self._due = False  # a write of the unwritten records is on its way
        self._torn = False  # a write fell short: the file is to be written anew
        self._rewrite()

    @classmethod
    def open(cls, path: Path, later: Callable[[Callable[[], None]], object]) -> LeaseFile | None:
        """The lease file at ``path``, its grants written when ``later`` calls back; None
        (said in the log) if it cannot be written (a full disk): the loader then runs
        without it."""
        try:
            return cls(path, later)
        except OSError as exc:
            log.warning("%s: %s; leases will not outlive a restart of this loader", path, exc)
            return None

    def lease_granted(self, key: str, holder: str, token: int) -> None:
        if key in self._held and key not in self._granted:  # a written grant passes on:
            self._unwritten.append(["ended", key])  # ended, should the new one end unwritten
        self._held[key] = self._granted[key] = (holder, token)
        if not self._due:
            self._due = True
            self._later(self.flush)

    def lease_ended(self, key: str) -> None:
        if self._held.pop(key, None) is not None and self._granted.pop(key, None) is None:
            self._unwritten.append(["ended", key])

    def flush(self) -> None:
        """Write what was granted (and ended) since the last write."""
        self._due = False
        records, self._unwritten = self._unwritten, []  # ends first: a key may be held again
        records += (["granted", key, *held] for key, held in self._granted.items())
        self._granted = {}
        if self._torn:  # the leases held, anew: what the records say is among them
            self._write_anew()
        elif records and self._fd >= 0:
            self._append(b"".join(map(_line, records)))

    def leases(self) -> list[tuple[str, str, int]]:
        return [(key, holder, token) for key, (holder, token) in self._held.items()]

    def close(self) -> None:
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _append(self, lines: bytes) -> None:
        """Best effort: a lease not written (a full disk) is still granted, only not kept
        across a restart. A write cut short leaves half a line, which the next line would
        spoil: the next flush writes the file anew."""
        try:
            written = os.write(self._fd, lines)
        except OSError as exc:
            written = 0
            log.warning("could not write %s: %s", self.path, exc)
        self._appended += written
        if written < len(lines):
            self._torn = True
        elif self._appended > REWRITE_AT:
            self._write_anew()

    def _write_anew(self) -> None:
        try:
            self._rewrite()
        except OSError as exc:
            self._torn = True
            log.warning("could not write %s anew: %s", self.path, exc)

    def _rewrite(self) -> None:
        """The file anew, holding only the leases held (written aside, then renamed)."""
        self._unwritten, self._granted = [], {}
        fresh = self.path.with_name(self.path.name + ".new")
        private_file(fresh)
        lines = b"".join(
            _line(["granted", key, holder, token]) for key, (holder, token) in self._held.items()
        )
        fd = os.open(fresh, os.O_WRONLY | os.O_TRUNC | os.O_APPEND | os.O_NOFOLLOW)
        try:
            if os.write(fd, lines) < len(lines):
                raise OSError(errno.ENOSPC, "written in part", str(fresh))
            os.replace(fresh, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                fresh.unlink()
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._appended, self._torn = fd, 0, False


def _line(record: list[object]) -> bytes:
    return _ENCODER.encode(record).encode("utf-8", "surrogatepass") + b"\n"


def _read(path: Path) -> dict[str, tuple[str, int]]:
    """The leases the file at ``path`` holds (none if there is no file)."""
    held: dict[str, tuple[str, int]] = {}
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return held
    for line in data.splitlines():
        try:
            record = json.loads(line.decode("utf-8", "surrogatepass"))
        except ValueError:  # cut short by a crash
            continue
        match record:
            case ["granted", str(key), str(holder), int(token)]:
                held[key] = (holder, token)
            case ["ended", str(key)]:
                held.pop(key, None)
    return held
