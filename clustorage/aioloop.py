"""The loader's event loop: uvloop where it is installed, else asyncio's own.

``$CLUSTORAGE_LOOP`` may choose: ``uvloop`` (the default where it is installed) or
``asyncio`` (the standard library's loop). bench/README.md, "The loader's loop", has the
figures behind the choice.
"""

from __future__ import annotations

import asyncio
import os

from .errors import ConfigError

__all__ = ["LOOPS", "loop_kind", "new_loop"]

LOOPS = ("uvloop", "asyncio")


def loop_kind() -> str:
    """The loop ``$CLUSTORAGE_LOOP`` asks for, or else uvloop where it is installed.

    Raises:
        ConfigError: an unknown loop, or uvloop asked for where it is not installed.
    """
    kind = os.environ.get("CLUSTORAGE_LOOP", "")
    if kind not in ("", *LOOPS):
        raise ConfigError(f"CLUSTORAGE_LOOP={kind!r}: choose one of {', '.join(LOOPS)}")
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if kind == "uvloop":
            raise ConfigError(
                "CLUSTORAGE_LOOP=uvloop, but uvloop is not installed: pip install uvloop"
            ) from None
        return "asyncio"
    return kind or "uvloop"


def new_loop() -> asyncio.AbstractEventLoop:
    """A new event loop of :func:`loop_kind`, not running and not set as the thread's loop."""
    if loop_kind() == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()
