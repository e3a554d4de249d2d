"""What every magics class shares: its session, and the one-line interrupt."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from IPython.core.magic import Magics

from ..errors import Interrupted

if TYPE_CHECKING:
    from .session import ClusterSession

__all__ = ["ClusterMagics", "Interrupted"]


class ClusterMagics(Magics):
    """Base: magics that share one :class:`ClusterSession`."""

    def __init__(self, shell: Any, session: ClusterSession) -> None:
        super().__init__(shell)
        self.session = session
