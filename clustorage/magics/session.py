"""One :class:`ClusterSession` per shell: the node it follows, its namespace, its errors."""

from __future__ import annotations

import contextlib
import linecache
import logging
import os
import sys
import weakref
from types import TracebackType
from typing import Any, NamedTuple

from IPython.core.error import UsageError

import clustorage
from clustorage import ClustorageError, CompileError, Node
from clustorage.namespace import NamespaceSync
from clustorage.shell_complete import ClusterMatcher

from .between_cells import BetweenCells
from .functions import FunctionMagics
from .nodes import NodeMagics, not_reachable_yet, start_node
from .values import ValueMagics
from .waiting import showing_waits

__all__ = ["NO_NODE", "CellFile", "ClusterSession", "CurrentCell", "session_for", "show_error"]

log = logging.getLogger(__name__)

NO_NODE = (
    "no clustorage node runs here: start one with %cluster_start --name NAME "
    "[--loader LOADER] (no --loader: this node is the loader)"
)

MAGICS = (NodeMagics, ValueMagics, FunctionMagics)

_sessions: weakref.WeakKeyDictionary[Any, ClusterSession] = weakref.WeakKeyDictionary()


def _no_node(*args: Any, **kwargs: Any) -> Any:
    """``get`` and ``call`` once the node they were bound to is stopped."""
    raise UsageError(NO_NODE)


class CellFile(NamedTuple):
    """The file name under which a cell's lines are shown, and the ``N`` of its ``In[N]``."""

    name: str
    number: int

    @property
    def label(self) -> str:
        """The cell as IPython names it in tracebacks: ``Cell In[N]``."""
        return f"Cell In[{self.number}]"


class CurrentCell(NamedTuple):
    """The cell being run: its text and the number IPython shows for it (``In[N]``)."""

    raw: str
    transformed: str
    number: int


class ClusterSession:
    """What the magics of one shell share: the node it follows and its namespace sync.

    Args:
        shell: the IPython ``InteractiveShell`` (a kernel's or a terminal's).

    Attributes:
        sync: the :class:`NamespaceSync` binding cluster functions into ``shell.user_ns``;
            a terminal front-end may set ``sync.wakeup`` to apply hot-loads before the next
            prompt instead of waiting for the next cell.
        bind_api: also bind ``get``, ``call`` and ``node`` of the followed node into
            ``user_ns`` (the clustorage kernel does, as the shell does), unless the user
            holds those names.
    """

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        # A shell that announces every hot-load itself (the clustorage terminal shell, which
        # has a cluster_name) needs only the notices no one else gives (SPEC "call" 8-9).
        self.sync = NamespaceSync(
            shell.user_ns, announce_rebinds=not hasattr(shell, "cluster_name")
        )
        self.startup_error: str | None = None
        self._unreachable_at_start: Node | None = None  # whether it is: the first cell says
        self.bind_api = False
        self.cell: CurrentCell | None = None
        self._api: dict[str, Any] = {}
        self._owns_custom_exc = False
        self._matcher = ClusterMatcher(self.names)
        # In a kernel (which has one), the library's warnings wait for the next cell.
        self._warnings = BetweenCells() if getattr(shell, "kernel", None) is not None else None

    # -- node ------------------------------------------------------------------------------

    def node(self) -> Node:
        """The running default node, followed by the namespace sync.

        Raises:
            UsageError: no node runs in this process.
        """
        node = clustorage.default_node()
        if node is None:
            raise UsageError(NO_NODE)
        self.follow(node)
        return node

    def follow(self, node: Node | None) -> None:
        """Bind the functions of ``node`` from now on (none: stop following)."""
        self.sync.namespace = self.shell.user_ns
        if node is None:
            self.sync.detach()
            if self.bind_api and self._api:
                self._bind_api({"get": _no_node, "call": _no_node, "node": None})
        else:
            self.sync.attach(node)
            if self.bind_api:
                names = {"get": showing_waits(self.shell, node), "call": node.call, "node": node}
                self._bind_api(names)

    def _bind_api(self, names: dict[str, Any]) -> None:
        """Bind ``get``, ``call`` and ``node`` to ``names``, unless the user rebound them."""
        ns = self.shell.user_ns
        mine = {
            name: value
            for name, value in names.items()
            if name not in ns or (name in self._api and ns[name] == self._api[name])
        }
        self._api = names
        ns.update(mine)

    def names(self) -> tuple[list[str], list[str]]:
        """The followed node's keys and function names, for completion (never the network)."""
        node = clustorage.default_node()
        return (node.keys(), node.functions()) if node is not None else ([], [])

    def autostart(self, env: dict[str, str] | None = None, at_startup: bool = False) -> Node | None:
        """Start the default node when ``CLUSTORAGE_LOADER`` or ``CLUSTORAGE_NAME`` is set.

        With ``CLUSTORAGE_LOADER`` this node joins that cluster as a member (named by
        ``CLUSTORAGE_NAME``, else a generated name); with only ``CLUSTORAGE_NAME`` it is the
        loader; with neither nothing starts until ``%cluster_start``. A failure is remembered
        and shown as one line before the first cell, never raised into the shell's startup.
        """
        env = dict(os.environ) if env is None else env
        node = clustorage.default_node()
        if node is None and (env.get("CLUSTORAGE_LOADER") or env.get("CLUSTORAGE_NAME")):
            try:
                node = start_node()
                if at_startup:  # no cell to say it in yet: the first one says it
                    self._unreachable_at_start = node
                elif notice := not_reachable_yet(node):
                    print(notice, flush=True)
            except Exception as exc:
                self.startup_error = (
                    f"clustorage: this kernel's node did not start ({type(exc).__name__}: "
                    f"{exc}); start it with %cluster_start"
                )
                log.warning("%s", self.startup_error)
        self.follow(node)
        return node

    # -- the cell being run ----------------------------------------------------------------

    def cell_file(self, magic: str, body: str, lines: str) -> CellFile:
        """The file tracebacks show as this cell (``Cell In[N]``), holding ``lines``.

        When the cell being run is the ``%%magic`` cell with this ``body``, its own file
        name is used, so a traceback names the cell the user ran; otherwise (a magic called
        from code) the text gets a name of its own, numbered as the cell that called it.
        """
        shell = self.shell
        cell = self.cell
        if (
            cell is not None
            and cell.raw.lstrip().startswith(f"%%{magic}")
            and body.strip() in cell.raw
        ):
            name: str = shell.compile.get_code_name(cell.raw, cell.transformed, cell.number)
            number = cell.number
        else:
            # run_cell counts a cell before running it: execution_count is the next one.
            number = cell.number if cell is not None else shell.execution_count
            name = shell.compile.cache(lines, number)
        shell.compile._filename_map[name] = number
        linecache.cache[name] = (len(lines), None, lines.splitlines(keepends=True), name)
        return CellFile(name, number)

    # -- shell hooks -----------------------------------------------------------------------

    def pre_run_cell(self, info: Any = None) -> None:
        """Before each cell: show a startup failure once, then apply queued hot-loads."""
        if info is not None and getattr(info, "raw_cell", None) is not None:
            # run_cell has counted this cell already when it stores history.
            number = self.shell.execution_count - (1 if info.store_history else 0)
            transformed = info.transformed_cell or info.raw_cell
            self.cell = CurrentCell(info.raw_cell, transformed, number)
        if self._warnings is not None:
            self._warnings.cell_starts()
        if self.startup_error is not None:
            print(self.startup_error, file=sys.stderr, flush=True)
            self.startup_error = None
        node, self._unreachable_at_start = self._unreachable_at_start, None
        if node is not None and (notice := not_reachable_yet(node)):
            print(notice, flush=True)
        self.follow(clustorage.default_node())
        self.sync.apply()

    def _cell_ends(self, result: Any = None) -> None:
        if self._warnings is not None:
            self._warnings.cell_ends()

    def install(self) -> None:
        """Register the magics, the hook, completion and the one-line error display.

        Also binds the name ``clustorage`` in ``user_ns`` unless it is taken.
        """
        shell = self.shell
        shell.register_magics(*(cls(shell, self) for cls in MAGICS))
        shell.events.register("pre_run_cell", self.pre_run_cell)
        if self._warnings is not None:
            shell.events.register("post_run_cell", self._cell_ends)
            logging.getLogger("clustorage").addHandler(self._warnings)
        matchers = shell.Completer.custom_matchers
        if self._matcher not in matchers:
            matchers.append(self._matcher)
        if "clustorage" not in shell.user_ns:  # notices point at clustorage.functions.NAME
            shell.push({"clustorage": clustorage}, interactive=False)
        if not shell.custom_exceptions:  # leave someone else's handler alone
            shell.set_custom_exc((ClustorageError,), show_error)
            self._owns_custom_exc = True

    def uninstall(self) -> None:
        """Undo :meth:`install`; the node keeps running and bound names stay."""
        shell = self.shell
        with contextlib.suppress(ValueError):
            shell.events.unregister("pre_run_cell", self.pre_run_cell)
        if self._warnings is not None:
            with contextlib.suppress(ValueError):
                shell.events.unregister("post_run_cell", self._cell_ends)
            logging.getLogger("clustorage").removeHandler(self._warnings)
        with contextlib.suppress(ValueError):
            shell.Completer.custom_matchers.remove(self._matcher)
        if self._owns_custom_exc:
            shell.set_custom_exc((), None)
            self._owns_custom_exc = False
        manager = shell.magics_manager
        for cls in MAGICS:
            for kind, names in cls.magics.items():
                for name in names:
                    manager.magics[kind].pop(name, None)
            manager.registry.pop(cls.__name__, None)
        self.sync.detach()


def show_error(
    shell: Any,
    etype: type[BaseException],
    value: BaseException,
    tb: TracebackType | None,
    tb_offset: int | None = None,
) -> list[str]:
    """Show a clustorage error as ``Type: message``; a CompileError with its source line.

    The error is kept as IPython keeps the last one (``sys.last_*``), so ``%tb`` shows it
    afterwards: the full traceback, or for a CompileError the same source line and caret.
    """
    sys.last_type, sys.last_value, sys.last_traceback = etype, value, tb
    if sys.version_info >= (3, 12):
        sys.last_exc = value
    if isinstance(value, CompileError):
        shell.showsyntaxerror()
        return []
    stb = [f"{etype.__name__}: {value}"]
    shell._showtraceback(etype, value, stb)
    return stb


def session_for(shell: Any) -> ClusterSession | None:
    """The :class:`ClusterSession` of ``shell``, if the extension is loaded there."""
    return _sessions.get(shell)


def load(shell: Any, at_startup: bool = False) -> ClusterSession:
    """The session of ``shell``, created and installed on first use; ``at_startup``: as a
    kernel starts, before any cell (what it has to say waits for the first one)."""
    session = _sessions.get(shell)
    if session is None:
        session = _sessions[shell] = ClusterSession(shell)
        session.install()
        session.autostart(at_startup=at_startup)
    return session


def unload(shell: Any) -> None:
    """Uninstall the session of ``shell``, if any."""
    session = _sessions.pop(shell, None)
    if session is not None:
        session.uninstall()
