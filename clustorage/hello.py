"""What nodes say about themselves in the handshake, and how long they wait for each other."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import cloudpickle

from .config import DEAD_AFTER, LoaderAddress
from .errors import ConfigError

__all__ = [
    "DEAD_AFTER",
    "HEARTBEAT",
    "MAX_BACKLOG",
    "Timing",
    "check_welcome",
    "handshake_meta",
    "incompatibility",
    "max_backlog",
]

# Idle connections carry a frame this often, so that a cut link shows as unacknowledged
# data (see clustorage.liveness); nobody is judged dead for missing one.
HEARTBEAT = 1.0
HANDSHAKE = 5.0  # SPEC "Wire and trust": in all, not per byte
MAX_BACKLOG = 128 << 20


def max_backlog(env: Mapping[str, str] | None = None) -> int:
    """The loader's backlog cap per member, in bytes: ``$CLUSTORAGE_MAX_BACKLOG`` or 128 MiB.

    Raises:
        ConfigError: the variable is not a number of bytes of at least 1 MiB.
    """
    text = (os.environ if env is None else env).get("CLUSTORAGE_MAX_BACKLOG", "")
    if not text:
        return MAX_BACKLOG
    if not (text.isascii() and text.isdigit()) or int(text) < 1 << 20:
        raise ConfigError(
            f"invalid CLUSTORAGE_MAX_BACKLOG {text!r}: use a number of bytes, at least 1048576"
        )
    return int(text)


class Timing:
    """How long the loader waits for peers; one object shared by every connection."""

    def __init__(
        self,
        *,
        heartbeat: float = HEARTBEAT,
        dead_after: float = DEAD_AFTER,
        handshake: float = HANDSHAKE,
        write_limit: int | None = None,
    ) -> None:
        self.heartbeat = heartbeat
        self.dead_after = dead_after
        self.handshake = handshake
        # Unsent bytes a member may have queued before it is dropped (default max_backlog()).
        self.write_limit = max_backlog() if write_limit is None else write_limit


def handshake_meta(name: str, **extra: Any) -> dict[str, Any]:
    """What a node says about itself in the handshake."""
    return {
        "name": name,
        "python": "{}.{}".format(*sys.version_info[:2]),
        "cloudpickle": cloudpickle.__version__.split(".")[0],
        **extra,
    }


def incompatibility(ours: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """Why two nodes cannot exchange functions, or None when they can."""
    for what, label in (("python", "Python"), ("cloudpickle", "cloudpickle")):
        if ours.get(what) != theirs.get(what):
            return (
                f"{theirs.get('name')} runs {label} {theirs.get(what)} and "
                f"{ours.get('name')} runs {label} {ours.get(what)}: compiled functions cannot "
                f"move between them; use the same {label} version on every node"
            )
    return None


def check_welcome(welcome: Mapping[str, Any], loader: LoaderAddress) -> None:
    """Raise ConfigError if ``welcome`` refuses us, or comes from a loader not named as in
    ``loader`` (refusals a caller handles itself, like a name clash, come first)."""
    error = welcome.get("error")
    if welcome.get("kind") == "wrong_loader":
        raise ConfigError(
            f"{error}; use --loader {welcome.get('loader')}@{loader.host}:{loader.port}"
        )
    if error:
        raise ConfigError(str(error))
    if welcome.get("name") != loader.name:
        raise ConfigError(
            f"the loader at {loader.host}:{loader.port} is named "
            f"{welcome.get('name')!r}, not {loader.name!r}"
        )
