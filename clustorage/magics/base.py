"""What every magics class shares: its session, and the one-line interrupt."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from IPython.core.magic import Magics

if TYPE_CHECKING:
    from .session import ClusterSession

__all__ = ["ClusterMagics", "Interrupted"]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or a kernel interrupt ended a wait on the cluster: shown as one line."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a traceback through the library's waiting code.
        return [f"KeyboardInterrupt: {self}"]


class ClusterMagics(Magics):
    """Base: magics that share one :class:`ClusterSession`."""

    def __init__(self, shell: Any, session: ClusterSession) -> None:
        super().__init__(shell)
        self.session = session
