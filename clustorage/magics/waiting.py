# mypy: disallow-untyped-calls=False
"""A live line while a ``get`` waits on a key another node computes (SPEC "IPython / Jupyter").

In a notebook, once the wait has lasted a second, one output line says who computes the key
and for how long; it is updated in place (a display with a ``display_id``) and emptied when
the wait ends. It is drawn from a small thread, while the cell's own thread waits in the
library; the terminal shell shows the same in its toolbar instead.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from IPython.display import DisplayHandle, display

from clustorage import Node

from .display import duration

__all__ = ["WaitLine", "showing_waits"]


def showing_waits(shell: Any, node: Node) -> Callable[..., Any]:
    """``node.get`` for a kernel's namespace: the same, with :class:`WaitLine`'s live line
    while it waits on a key another node computes. A key held here goes straight through."""

    @functools.wraps(node.get)
    def get(key: Any, fn: Callable[[], Any] | None = None) -> Any:
        __tracebackhide__ = True
        if not isinstance(key, str) or node.version(key, "value"):
            return node.get(key, fn)
        with WaitLine(shell, node, key):
            return node.get(key, fn)

    return get


class WaitLine:
    """``with WaitLine(shell, node, key):`` around a ``get`` of ``key``.

    Args:
        shell: the IPython shell; only a kernel's shows the line.
        node: the node whose :meth:`Node.waiting` tells who computes the key.
        key: the key being fetched.
        delay: seconds of waiting before the line appears.
        period: seconds between updates.

    Attributes:
        holder: the node last seen computing the key (None: not seen waiting).
    """

    def __init__(
        self, shell: Any, node: Node, key: str, *, delay: float = 1.0, period: float = 0.5
    ) -> None:
        self.node = node
        self.key = key
        self.delay = delay
        self.period = period
        self.holder: str | None = None
        self._live = getattr(shell, "kernel", None) is not None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle: DisplayHandle | None = None

    def __enter__(self) -> WaitLine:
        if self._live:
            self._thread = threading.Thread(
                target=self._run, name=f"clustorage-wait-{self.key}", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._handle is not None:
            self._handle.update({"text/plain": ""}, raw=True)

    def text(self, holder: str, since: float, now: float | None = None) -> str:
        """The line: who computes the key, for how long."""
        elapsed = (time.time() if now is None else now) - since
        doing = f"{holder} is computing it" if holder else "it is being written"
        return (
            f"waiting for {self.key!r}: {doing} "
            f"({duration(elapsed)} so far; interrupt the kernel to stop waiting)"
        )

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(self.period):
            waits = [
                (holder, since) for key, holder, since in self.node.waiting() if key == self.key
            ]
            if not waits:
                continue
            self.holder, since = waits[0]
            if time.monotonic() - started < self.delay:
                continue
            line = {"text/plain": self.text(self.holder, since)}
            if self._stop.is_set():
                return
            if self._handle is None:
                self._handle = display(line, raw=True, display_id=True)
            else:
                self._handle.update(line, raw=True)
