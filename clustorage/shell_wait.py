"""The shell's toolbar while a ``get`` waits on a lease held elsewhere (SPEC "IPython / Jupyter":
who computes the key, and for how long, once the wait passes a second).

While a cell runs, prompt_toolkit's toolbar is not on screen: it is drawn only with the prompt.
So a thread polls ``node.waiting()`` (local state, no network) and draws the toolbar's row
itself (save the cursor, write the terminal's last row, restore the cursor). While that row
is drawn, ``sys.stdout`` and ``sys.stderr`` are wrapped so that whatever the cell prints first
erases it: output never lands on it, and the row is gone once the wait ends. While the prompt
is up, the prompt's own toolbar shows the same text (``waiting_fragments``) and the thread
redraws it every second.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from prompt_toolkit.formatted_text import StyleAndTextTuples

__all__ = ["SHOWN_AFTER", "WaitLine", "waiting_fragments", "waiting_text"]

SHOWN_AFTER = 1.0
POLL = 0.25

Wait = tuple[str, str, float]  # key, the node computing it, time.time() when the wait began


def waiting_text(waits: Sequence[Wait], now: float) -> str | None:
    """``waiting 3s for 'key': app3 computes it``, for the longest wait over SHOWN_AFTER."""
    long = [
        (now - since, key, holder) for key, holder, since in waits if now - since >= SHOWN_AFTER
    ]
    if not long:
        return None
    seconds, key, holder = max(long)
    more = f" (and {len(long) - 1} more)" if len(long) > 1 else ""
    doing = f"{holder} computes it" if holder else "it is being written"
    return f"waiting {seconds:.0f}s for {key!r}: {doing}{more}"


def waiting_fragments(waits: Sequence[Wait], now: float) -> StyleAndTextTuples:
    """The toolbar's part for the waits (nothing when none has lasted a second)."""
    text = waiting_text(waits, now)
    return [] if text is None else [("bold fg:ansiyellow", f"| {text} ")]


class _Guard:
    """A stream that erases the drawn row before anything is written through it."""

    def __init__(self, stream: TextIO, line: WaitLine) -> None:
        self._stream = stream
        self._line = line

    def write(self, text: str) -> int:
        self._line.erase()
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class WaitLine:
    """Polls the node's waits; draws them on the last row while a cell runs.

    Args:
        waits: the node's current waits (``node.waiting()``), or () when no node runs.
        prefix: the toolbar's text before the waits (`` app2 | member ``).
        at_prompt: whether the prompt is up (then ``redraw`` is called instead of drawing).
        redraw: asks the prompt to redraw its toolbar.
        fd: the terminal's file descriptor.
    """

    def __init__(
        self,
        waits: Callable[[], Sequence[Wait]],
        prefix: Callable[[], str],
        at_prompt: Callable[[], bool],
        redraw: Callable[[], None],
        fd: int = 1,
    ) -> None:
        self._waits = waits
        self._prefix = prefix
        self._at_prompt = at_prompt
        self._redraw = redraw
        self._fd = fd
        self._lock = threading.RLock()
        self._drawn = False
        self._streams: tuple[Any, Any] | None = None
        self._guards: tuple[_Guard, _Guard] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clustorage-wait-line", daemon=True)

    def start(self) -> None:
        if os.isatty(self._fd):
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.erase()

    def _run(self) -> None:
        shown = False
        while not self._stop.wait(POLL):
            try:
                text = waiting_text(self._waits(), time.time())
            except Exception:  # the node stopped under us: show nothing
                text = None
            if self._at_prompt():
                self.erase()
                if text is not None or shown:
                    self._redraw()  # the prompt's toolbar shows the waits itself
            elif text is not None:
                self._draw(f"{self._prefix()}| {text} ")
            else:
                self.erase()
            shown = text is not None

    def _row(self) -> int:
        try:
            return os.get_terminal_size(self._fd).lines
        except OSError:
            return 0

    def _draw(self, text: str) -> None:
        with self._lock:
            rows = self._row()
            if not rows:
                return
            if not self._drawn:
                self._streams = (sys.stdout, sys.stderr)
                # Kept referenced after they are unwrapped: print() holds sys.stdout by a
                # borrowed reference, and the guard unwraps itself in the middle of a print.
                self._guards = (_Guard(sys.stdout, self), _Guard(sys.stderr, self))
                sys.stdout, sys.stderr = self._guards
                self._drawn = True
            # Save the cursor, write the last row in reverse video, restore the cursor.
            line = f"\x1b7\x1b[{rows};1H\x1b[2K\x1b[7m{text}\x1b[0m\x1b8"
            with contextlib.suppress(OSError):
                os.write(self._fd, line.encode())

    def erase(self) -> None:
        """Erase the drawn row (if any) and unwrap the streams."""
        with self._lock:
            if not self._drawn:
                return
            self._drawn = False
            if self._streams is not None:  # unwrap, unless someone replaced them since
                out, err = self._streams
                if isinstance(sys.stdout, _Guard):
                    sys.stdout = out
                if isinstance(sys.stderr, _Guard):
                    sys.stderr = err
                self._streams = None
            rows = self._row()
            if rows:
                with contextlib.suppress(OSError):
                    os.write(self._fd, f"\x1b7\x1b[{rows};1H\x1b[2K\x1b8".encode())
