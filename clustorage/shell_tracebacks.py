"""The shell's tracebacks without the library's own frames.

The shell prints tracebacks as Python does (IPython's Plain mode), which shows every frame:
IPython leaves out frames whose code sets ``__tracebackhide__`` only in its verbose modes. A
``fn`` that raises inside ``get`` would show the frames of ``Node`` between the prompt's
line and the user's code; :func:`hide_library_frames` leaves those out.
"""

from __future__ import annotations

import types
from typing import Any

__all__ = ["hide_library_frames", "visible_frames"]


def _hidden(tb: types.TracebackType) -> bool:
    frame = tb.tb_frame
    return bool(frame.f_locals.get("__tracebackhide__")) and str(
        frame.f_globals.get("__name__", "")
    ).startswith("clustorage")


def visible_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """``tb`` without the clustorage frames that hide themselves."""
    kept = []
    while tb is not None:
        if not _hidden(tb):
            kept.append(tb)
        tb = tb.tb_next
    rebuilt = None
    for old in reversed(kept):
        rebuilt = types.TracebackType(rebuilt, old.tb_frame, old.tb_lasti, old.tb_lineno)
    return rebuilt


def hide_library_frames(formatter: Any) -> None:
    """Have IPython's traceback ``formatter`` (a shell's ``InteractiveTB``) leave them out."""
    structured = formatter.structured_traceback

    def without_library_frames(
        etype: Any, evalue: Any, etb: Any = None, tb_offset: Any = None, context: int = 5
    ) -> Any:
        return structured(etype, evalue, visible_frames(etb), tb_offset, context)

    formatter.structured_traceback = without_library_frames
