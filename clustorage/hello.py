"""What nodes say about themselves in the handshake, and how long they wait for each other."""

from __future__ import annotations

import sys
from typing import Any

import cloudpickle

from .config import DEAD_AFTER

__all__ = ["HEARTBEAT", "Timing", "handshake_meta", "incompatibility"]

# Idle connections carry a frame this often, so that a cut link shows as unacknowledged
# data (see clustorage.liveness); nobody is judged dead for missing one.
HEARTBEAT = 1.0


class Timing:
    """How long the loader waits for peers; one object shared by every connection."""

    def __init__(
        self,
        *,
        heartbeat: float = HEARTBEAT,
        dead_after: float = DEAD_AFTER,
        handshake: float = 5.0,
        stalled_after: float = 10.0,
        write_limit: int = 1 << 30,
    ) -> None:
        self.heartbeat = heartbeat
        self.dead_after = dead_after
        self.handshake = handshake
        self.stalled_after = stalled_after
        self.write_limit = write_limit


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
