"""Every error Clustorage raises.

::

    ClustorageError
    ├── ConfigError(ValueError)            a flag, name, address or cookie file is wrong
    ├── AuthenticationError(PermissionError)  the cookie did not match, or the peer lied
    ├── NameClashError                     a live node already has this name
    ├── LoaderUnavailable(ConnectionError) the loader cannot be reached right now
    ├── NotFound(KeyError)                 no such key or function in the cluster, and no fn
    ├── ProtocolError                      the wire was misused
    │   ├── LocalProtocolError             ... by us (a bug or a misuse of the API)
    │   └── RemoteProtocolError            ... by the peer (garbage, forgery, replay, oversize)
    │       └── FrameTooLarge              ... a frame over the size limit
    ├── CompileError(SyntaxError)          function source did not compile or define NAME
    ├── ValueTooLarge(ValueError)          a value's payload is over the frame limit
    ├── DeadlockError(RuntimeError)        a fn needs a key whose computation waits on it
    ├── LeaseLost                          a commit from a holder whose lease passed on
    ├── StoreError(OSError)                the loader's SQLite store cannot be opened or written
    └── RemoteError                        the loader failed a request; carries its message
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ClustorageError",
    "CompileError",
    "ConfigError",
    "DeadlockError",
    "FrameTooLarge",
    "Interrupted",
    "LeaseLost",
    "LoaderUnavailable",
    "LocalProtocolError",
    "NameClashError",
    "NotFound",
    "ProtocolError",
    "RemoteError",
    "RemoteProtocolError",
    "StoreError",
    "ValueTooLarge",
]


class ClustorageError(Exception):
    """The root of every Clustorage error."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or a kernel interrupt ended a wait on the cluster (a KeyboardInterrupt, shown
    by IPython as one line instead of a traceback through the waiting code)."""

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


class ConfigError(ClustorageError, ValueError):
    """A flag, environment variable, node name, address or cookie file is not usable."""


class AuthenticationError(ClustorageError, PermissionError):
    """The peer does not know our cookie (or we do not know its)."""


class NameClashError(ClustorageError):
    """The loader refused us because a live node already has our name."""


class LoaderUnavailable(ClustorageError, ConnectionError):
    """The loader cannot be reached; cached entries still work, misses do not."""


class NotFound(ClustorageError, KeyError):
    """The cluster has no such key or function, and nothing was given to make it."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ProtocolError(ClustorageError):
    """The wire protocol was violated; the connection is unusable afterwards."""


class LocalProtocolError(ProtocolError):
    """We misused the protocol object (our bug)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol (its fault)."""


class FrameTooLarge(RemoteProtocolError):
    """A frame announced a length over the connection's limit."""


class ValueTooLarge(ClustorageError, ValueError):
    """A value is too large to send in one frame."""


class DeadlockError(ClustorageError, RuntimeError):
    """A ``fn`` needs a key that cannot be computed before it returns: its own key, or one
    whose computation waits (through other keys, on any node) on a key this thread holds."""


class LeaseLost(ClustorageError):
    """This node's lease on a key passed to another node (it was cut off); its value was
    not stored. ``get`` the key again for the value the cluster settled on."""


class StoreError(ClustorageError, OSError):
    """The loader's store cannot be opened or written (unwritable directory, full disk)."""


class RemoteError(ClustorageError):
    """The loader could not carry out a request; the message says why."""


class CompileError(ClustorageError, SyntaxError):
    """Function source did not compile on the loader, or did not define the function.

    Carries the loader's message, the file name ``<cluster:NAME>``, line and column,
    like a ``SyntaxError``. When ``cell`` names where the user typed the source (such as
    ``Cell In[7]``), line and column count in that cell, and the message says so.
    """

    def __init__(
        self,
        msg: str,
        *,
        name: str,
        lineno: int | None = None,
        offset: int | None = None,
        text: str | None = None,
        cell: str | None = None,
    ) -> None:
        filename = f"<cluster:{name}>"
        super().__init__(msg, (filename, lineno, offset, text))
        self.name = name
        self.cell = cell

    def __reduce__(self) -> tuple[object, ...]:
        fields = (self.msg, self.name, self.lineno, self.offset, self.text, self.cell)
        return (_rebuild_compile_error, fields)

    def __str__(self) -> str:
        # Not self.filename: a front-end may point that at the cell for its display.
        where = f"<cluster:{self.name}>"
        if self.cell is not None:
            where += f" in {self.cell}"
        if self.lineno is not None:
            where += f", line {self.lineno}"
            if self.offset is not None:
                where += f", column {self.offset}"
        return f"{self.msg} ({where})"


def _rebuild_compile_error(
    msg: str,
    name: str,
    lineno: int | None,
    offset: int | None,
    text: str | None,
    cell: str | None = None,
) -> CompileError:
    return CompileError(msg, name=name, lineno=lineno, offset=offset, text=text, cell=cell)
