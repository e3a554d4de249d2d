"""The terminal shell's UI: IPython's prompt_toolkit shell, dressed for one cluster node.

Theory of operation. IPython's ``TerminalInteractiveShell`` reads code with one
prompt_toolkit ``PromptSession`` (inside ``patch_stdout(raw=True)``) and evaluates it with
``run_cell`` on the main thread. This subclass changes only what the user sees:

- the prompt is ``NAME>`` (continuation ``...>``), history lives in
  ``~/.clustorage/history/NAME``;
- the bottom toolbar draws a :class:`Snapshot` of the node, replaced whole by the node's
  ``on_change``/``on_load`` callbacks (local reads only) and redrawn with the thread-safe
  ``Application.invalidate()``: drawing never touches the network; a ``get`` waiting over a
  second on a lease held elsewhere shows there too, even while a cell runs
  (:mod:`clustorage.shell_wait`);
- a hot-load made by another node is announced in one line above the prompt. While the
  prompt is up, the line is printed to the patched stdout, which prompt_toolkit draws above
  the line being typed without disturbing it; while a cell runs, it waits for the cell to end.
  Losing and regaining the loader are such lines too; the library's log record of a lost
  loader is left out, so that it is said once.

Evaluation, magics (``clustorage.magics``), tracebacks and the namespace stay IPython's.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from IPython.terminal.interactiveshell import TerminalInteractiveShell
from IPython.terminal.prompts import Prompts
from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.history import FileHistory
from pygments.token import Token  # type: ignore[import-untyped]
from traitlets import Unicode, default

import clustorage
from clustorage import LoadEvent, Node
from clustorage.config import private_directory

from .magics import LOST, LeaveOut, session_for
from .namespace import NamespaceSync
from .shell_complete import ClusterMatcher
from .shell_tracebacks import hide_library_frames
from .shell_wait import WaitLine, waiting_fragments

__all__ = [
    "ClusterPrompts",
    "ClusterShell",
    "Snapshot",
    "count",
    "history_path",
    "notice_text",
    "snapshot",
    "toolbar_fragments",
]

NOTICE = "[cluster]"


def history_path(name: str) -> Path:
    """``~/.clustorage/history/NAME``, created private (mode 0600) if missing."""
    path = Path.home() / ".clustorage" / "history" / name
    private_directory(path.parent)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    return path


class Snapshot(NamedTuple):
    """What the toolbar shows; computed from local state, replaced whole."""

    name: str
    role: str
    loader: str
    connected: bool
    nodes: tuple[str, ...]
    keys: tuple[str, ...]
    functions: tuple[str, ...]


def snapshot(node: Node) -> Snapshot:
    """The node's state as of now, from its replica and channel only (no network)."""
    return Snapshot(
        node.name,
        node.role,
        node.loader_address.split("@")[0],
        node.connected,
        tuple(node.nodes()),
        tuple(node.keys()),
        tuple(node.functions()),
    )


def count(n: int, what: str) -> str:
    """``1 node``, ``2 nodes``."""
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def toolbar_fragments(snap: Snapshot) -> StyleAndTextTuples:
    """The bottom toolbar: role, loader state, node count, keys and functions."""
    parts: StyleAndTextTuples = [("bold", f" {snap.name} | {snap.role} | ")]
    if snap.role != "loader":
        if snap.connected:
            parts.append(("", f"loader {snap.loader}: connected | "))
        else:
            parts.append(("bold fg:ansired", f"loader {snap.loader}: reconnecting"))
            parts.append(("", " | "))
    parts.append(
        (
            "",
            f"{count(len(snap.nodes), 'node')} | {count(len(snap.keys), 'key')} | "
            f"{count(len(snap.functions), 'function')} ",
        )
    )
    return parts


def notice_text(event: LoadEvent) -> str:
    """The one line announcing a hot-load made elsewhere, e.g. ``sum v2 loaded from app3``."""
    what = event.key if event.kind == "function" else f"value {event.key!r}"
    if event.removed:
        return f"{NOTICE} {what} deleted"
    return f"{NOTICE} {what} v{event.version} loaded from {event.origin}"


def _same(a: object, b: object) -> bool:
    """``a is b``, counting two bound methods of one object's one function as the same."""
    if a is b:
        return True
    if inspect.ismethod(a) and inspect.ismethod(b):
        return a.__self__ is b.__self__ and a.__func__ is b.__func__
    return False


class ClusterPrompts(Prompts):
    """``NAME>`` for input, ``...>`` to continue it, nothing before results."""

    @property
    def name(self) -> str:
        return str(getattr(self.shell, "cluster_name", ""))

    def in_prompt_tokens(self) -> list[tuple[Any, str]]:
        return [(Token.Prompt, f"{self.name}> ")]

    def continuation_prompt_tokens(
        self, width: int | None = None, *, lineno: int | None = None, wrap_count: int | None = None
    ) -> list[tuple[Any, str]]:
        if width is None:
            width = len(self.name) + 2
        return [(Token.Prompt.Continuation, "...> ".rjust(width))]

    def rewrite_prompt_tokens(self) -> list[tuple[Any, str]]:
        return []

    def out_prompt_tokens(self) -> list[tuple[Any, str]]:
        return []


class ClusterShell(TerminalInteractiveShell):
    """IPython's terminal shell with a cluster prompt, toolbar, history and notices.

    Create it with ``ClusterShell.instance(cluster_name=NAME, config=...)``, then
    :meth:`attach` the running node before :meth:`mainloop`.
    """

    cluster_name = Unicode("")

    @default("prompts")
    def _cluster_prompts(self) -> Prompts:
        return ClusterPrompts(self)

    def __init__(self, **kwargs: Any) -> None:
        self._node: Node | None = None
        self._snapshot: Snapshot | None = None
        self._unsubscribe: list[Any] = []
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._at_prompt = False
        self._ready = False
        self._sync: NamespaceSync | None = None
        self._wait_line: WaitLine | None = None
        # The followed node's lost loader is said by a notice above the prompt, not by the
        # library's log.
        self._lost_loader_records = LeaveOut(LOST, node="")
        super().__init__(**kwargs)
        hide_library_frames(self.InteractiveTB)
        if self.pt_app is not None:
            history = FileHistory(str(history_path(self.cluster_name)))
            self.pt_app.history = history
            self.pt_app.default_buffer.history = history

    # -- the node --------------------------------------------------------------------------

    def attach(self, node: Node) -> None:
        """Show ``node`` in the toolbar, announce its hot-loads, complete its names."""
        self._lost_loader_records.install()
        self.Completer.custom_matchers.append(ClusterMatcher(self._names))
        self.events.register("post_run_cell", self._after_cell)
        session = session_for(self)
        if session is not None:
            # Bind hot-loaded functions while the prompt is up, not only before the next cell.
            self._sync = session.sync
            session.sync.wakeup = self._wakeup
        self._follow(node)
        self._wait_line = WaitLine(self._waits, self._toolbar_prefix, self._prompt_up, self._redraw)
        self._wait_line.start()

    def _waits(self) -> list[tuple[str, str, float]]:
        """The node's waits on leases held elsewhere (local state); none if it stopped."""
        node = self._node
        if node is None or node.stopped:
            return []
        try:
            return node.waiting()
        except Exception:  # a toolbar that raises would end the prompt
            return []

    def _toolbar_prefix(self) -> str:
        snap = self._snapshot
        return f" {snap.name} | {snap.role} " if snap is not None else " "

    def _prompt_up(self) -> bool:
        return self._at_prompt

    def _redraw(self) -> None:
        app = self.pt_app.app if self.pt_app is not None else None
        if app is not None:
            app.invalidate()

    def _follow(self, node: Node | None) -> None:
        """Listen to ``node`` (``%cluster_stop``/``%cluster_start`` change it), or to none."""
        self.detach()
        self._bind_names(self._node, node)
        self._node = node
        self._lost_loader_records.node = node.name if node is not None else ""
        self._snapshot = snapshot(node) if node is not None else None
        if node is not None:
            self.cluster_name = node.name
            self._unsubscribe = [node.on_change(self._on_change), node.on_load(self._on_load)]
            self._wakeup()

    def close(self) -> None:
        """Before the shell exits: stop listening to the node, stop drawing waits."""
        self.detach()
        self._lost_loader_records.uninstall()
        if self._wait_line is not None:
            self._wait_line.stop()

    def _bind_names(self, old: Node | None, new: Node | None) -> None:
        """Point ``get``, ``call`` and ``node`` at ``new``, unless the user rebound them."""
        if new is None:
            return
        names = {"get": new.get, "call": new.call, "node": new}
        previous = {"get": old.get, "call": old.call, "node": old} if old else {}
        ns = self.user_ns
        mine = {k: v for k, v in names.items() if k not in ns or _same(ns[k], previous.get(k))}
        self.push(mine, interactive=False)  # type: ignore[no-untyped-call]

    def detach(self) -> None:
        """Stop listening to the node (before it stops)."""
        for unsubscribe in self._unsubscribe:
            with contextlib.suppress(ValueError):
                unsubscribe()
        self._unsubscribe = []

    def _wakeup(self) -> None:
        # On the node's background thread: ask the prompt's event loop (the main thread,
        # idle while the user types) to bind queued functions into the namespace.
        app = self.pt_app.app if self.pt_app is not None else None
        loop = app.loop if app is not None and app.is_running else None
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the prompt has just closed
                loop.call_soon_threadsafe(self._bind_functions)

    def _bind_functions(self) -> None:
        if self._sync is not None and self._at_prompt:
            self._sync.apply()

    def _names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        snap = self._snapshot
        return (snap.keys, snap.functions) if snap else ((), ())

    def _refresh(self) -> Snapshot | None:
        node = self._node
        if node is None:
            return None
        old, self._snapshot = self._snapshot, snapshot(node)
        app = self.pt_app.app if self.pt_app is not None else None
        if app is not None:
            app.invalidate()  # thread-safe; a no-op when no prompt is up
        return old

    def _on_change(self) -> None:
        # On the node's background thread: local reads and a redraw request only.
        old = self._refresh()
        new = self._snapshot
        if old is None or new is None or new.role == "loader" or old.connected == new.connected:
            return
        if clustorage.default_node() is not self._node:  # stopped on purpose
            return
        if new.connected:
            self._notice(f"{NOTICE} reconnected to loader {new.loader}")
        else:
            self._notice(
                f"{NOTICE} lost loader {new.loader}; reconnecting (loaded values and "
                "functions still work)"
            )

    def _on_load(self, event: LoadEvent) -> None:
        self._refresh()
        node = self._node
        if node is not None and event.origin != node.name:
            self._notice(notice_text(event))

    # -- notices ---------------------------------------------------------------------------

    def _notice(self, text: str) -> None:
        """Print ``text`` above the prompt now, or after the running cell."""
        with self._lock:
            if not self._ready:
                return
            if not self._at_prompt:
                self._pending.append(text)
                return
        # sys.stdout is prompt_toolkit's patched proxy while the prompt is up: it is drawn
        # above the prompt, keeping the line being typed.
        print(text, file=sys.stdout, flush=True)

    def _flush_notices(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for text in pending:
            print(text, flush=True)

    def _after_cell(self, result: Any = None) -> None:
        current = clustorage.default_node()
        if current is not self._node:
            self._follow(current)
        self._flush_notices()

    # -- IPython hooks ---------------------------------------------------------------------

    def prompt_for_code(self) -> str:
        self._flush_notices()
        if self._sync is not None:
            self._sync.apply()
        with self._lock:
            self._at_prompt = self._ready = True
        try:
            text: str = super().prompt_for_code()  # type: ignore[no-untyped-call]
        finally:
            with self._lock:
                self._at_prompt = False
        return text

    def _extra_prompt_options(self) -> dict[str, Any]:
        options: dict[str, Any] = super()._extra_prompt_options()  # type: ignore[no-untyped-call]
        options["bottom_toolbar"] = self._toolbar
        return options

    def _toolbar(self) -> StyleAndTextTuples:
        snap = self._snapshot
        if snap is None:
            return [("", " no node runs here: %cluster_start --name NAME [--loader LOADER] ")]
        return toolbar_fragments(snap) + waiting_fragments(self._waits(), time.time())
