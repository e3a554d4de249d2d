"""IPython magics: ``%load_ext clustorage`` (SPEC "IPython / Jupyter").

One module per topic, as IPython's ``core/magics`` package; each magic parses its line and
makes one call into the library:

- :mod:`.nodes`: ``%cluster_start``, ``%cluster_stop``, ``%cluster_status``
- :mod:`.values`: ``%cluster_get``, ``%%cluster_get``, ``%cluster_keys``, ``%cluster_delete``
- :mod:`.functions`: ``%cluster_call``, ``%%cluster_call``, ``%cluster_functions``,
  ``%cluster_source``

They share one :class:`ClusterSession` per shell (:mod:`.session`), which follows the
process's default node, binds hot-loaded functions into ``user_ns`` before each cell (a
:class:`~clustorage.namespace.NamespaceSync` applied on ``pre_run_cell``), completes cluster
keys and function names, and shows every clustorage error as one line instead of a
traceback (a ``CompileError`` with its source line and a caret). User mistakes raise
``UsageError``. :mod:`.parsing` reads magic lines; :mod:`.display` holds what they return;
:mod:`.loader_link` leaves out the library's log records of what a front-end says itself.
"""

from __future__ import annotations

from typing import Any

from .base import Interrupted
from .display import ClusterStatus, SourceText, describe
from .functions import FunctionMagics
from .loader_link import LOST, LeaveOut
from .nodes import NodeMagics
from .parsing import split_arguments
from .session import ClusterSession, load, session_for, unload
from .values import ValueMagics

__all__ = [
    "LOST",
    "ClusterSession",
    "ClusterStatus",
    "FunctionMagics",
    "Interrupted",
    "LeaveOut",
    "NodeMagics",
    "SourceText",
    "ValueMagics",
    "describe",
    "load_ipython_extension",
    "session_for",
    "split_arguments",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython: Any, at_startup: bool = False) -> None:
    """``%load_ext clustorage``: register the magics; start the node if the env says so
    (``at_startup``: as a kernel starts, see :func:`.session.load`)."""
    load(ipython, at_startup)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext clustorage``: remove the magics and hooks (the node keeps running)."""
    unload(ipython)
