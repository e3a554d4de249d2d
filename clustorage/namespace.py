"""Hot-loaded cluster functions, bound into a user namespace between cells.

A node tells its ``on_load`` listeners about every install from a background thread, but a
user namespace (an IPython ``user_ns``, a shell's globals) belongs to the thread that runs the
user's code. :class:`NamespaceSync` therefore only *queues* names on the background thread;
the owner calls :meth:`NamespaceSync.apply` between cells (IPython's ``pre_run_cell`` event,
or a prompt loop's callback) and the names are bound there. Nothing is printed from the
background thread, so no output lands in whichever cell ran last.

Binding never clobbers the user's own objects (SPEC "call" 8): a name is (re)bound only if it
is absent or holds a cluster version of that function; otherwise it is left alone and a one-line
notice says where the cluster's version is. A function named like a builtin is bound, and a
notice says once that it shadows the builtin; when it is deleted the builtin shows through
again, and a notice says so. A new version arriving from another node rebinds the name with a
one-line notice (SPEC "call" 9), unless the owner announces hot-loads itself
(``announce_rebinds=False``). Values are never bound, only functions. Notices are given by
:meth:`NamespaceSync.apply`, on the owner's thread: in a notebook, in the next cell's output.

>>> sync = NamespaceSync(shell.user_ns)
>>> sync.attach(clustorage.default_node())
>>> shell.events.register("pre_run_cell", lambda info: sync.apply())
"""

from __future__ import annotations

import builtins
import sys
import threading
from collections.abc import Callable, MutableMapping
from typing import Any

from . import LoadEvent, Node

__all__ = ["NamespaceSync", "is_cluster_function"]

FUNCTION = "function"


def is_cluster_function(obj: object, name: str) -> bool:
    """Whether ``obj`` is a version of cluster function ``name`` (code file ``<cluster:NAME>``)."""
    code = getattr(obj, "__code__", None)
    return getattr(code, "co_filename", None) == f"<cluster:{name}>"


def _print_notice(text: str) -> None:
    print(text, file=sys.stdout, flush=True)


class NamespaceSync:
    """Keeps one namespace's bindings of cluster functions up to date with a node.

    Args:
        namespace: the dict-like namespace to bind functions in (e.g. ``shell.user_ns``).
        notice: called with a one-line message when a name is taken by the user's own object
            (default: print it to stdout). Called from :meth:`apply`, on the owner's thread.
        wakeup: called (from the node's background thread) whenever something was queued, so
            an event loop can schedule :meth:`apply`; may also be set later as ``sync.wakeup``.
        announce_rebinds: give a notice when a version from another node replaces the one
            bound, or another node deletes it (off where the owner announces every hot-load).

    Thread safety: :meth:`queue` (the ``on_load`` listener) may run on any thread; every other
    method belongs to the namespace's owner thread.
    """

    def __init__(
        self,
        namespace: MutableMapping[str, Any],
        *,
        notice: Callable[[str], None] | None = None,
        wakeup: Callable[[], None] | None = None,
        announce_rebinds: bool = True,
    ) -> None:
        self.namespace = namespace
        self.notice = notice or _print_notice
        self.wakeup = wakeup
        self.announce_rebinds = announce_rebinds
        self.node: Node | None = None
        # Names to look at, in order, with the load event that queued them (if any).
        self._pending: dict[str, LoadEvent | None] = {}
        self._lock = threading.Lock()
        self._installed: dict[str, Any] = {}  # name -> the object this sync bound
        self._noticed: set[str] = set()
        self._shadowing: set[str] = set()  # bound names that shadow a builtin, told once
        self._unsubscribe: Callable[[], None] | None = None

    # -- node ------------------------------------------------------------------------------

    def attach(self, node: Node) -> None:
        """Follow ``node``: queue every function it has loaded now and each one it loads later.

        Attaching to another node first detaches from the current one.
        """
        if node is self.node:
            return
        self.detach()
        self.node = node
        self._unsubscribe = node.on_load(self.queue)
        with self._lock:  # subscribed first, so nothing loaded meanwhile is missed
            for name in node.functions():
                self._pending.setdefault(name, None)

    def detach(self) -> None:
        """Stop following the node; names already bound stay bound."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._unsubscribe = None
        self.node = None
        with self._lock:
            self._pending.clear()

    # -- queueing (any thread) -------------------------------------------------------------

    def queue(self, event: LoadEvent) -> None:
        """The ``on_load`` listener: remember that function ``event.key`` changed."""
        if event.kind != FUNCTION:
            return
        with self._lock:
            self._pending[event.key] = event
        wakeup = self.wakeup
        if wakeup is not None:
            wakeup()

    def request(self, name: str) -> None:
        """Queue ``name`` to be looked at on the next :meth:`apply`."""
        with self._lock:
            self._pending.setdefault(name, None)

    @property
    def pending(self) -> list[str]:
        """Names waiting for :meth:`apply`."""
        with self._lock:
            return list(self._pending)

    # -- applying (owner thread) -----------------------------------------------------------

    def apply(self) -> list[str]:
        """Bind (or unbind) every queued name to the node's current version.

        Returns:
            The names whose binding changed.
        """
        with self._lock:
            pending, self._pending = self._pending, {}
        node = self.node
        if node is None:
            return []
        changed = []
        for name, event in pending.items():
            origin = event.origin if event is not None else None
            try:
                function = node.function(name)
            except KeyError:  # removed from the cluster (NotFound is a KeyError)
                if self.unbind(name, origin=origin):
                    changed.append(name)
            else:
                version = event.version if event is not None else node.version(name)
                if self.bind(name, function, version=version, origin=origin):
                    changed.append(name)
        return changed

    def owns(self, name: str) -> bool:
        """Whether ``namespace[name]`` holds a cluster version of function ``name``."""
        held = self.namespace.get(name)
        return held is not None and (
            held is self._installed.get(name) or is_cluster_function(held, name)
        )

    def _from_elsewhere(self, origin: str | None) -> bool:
        node = self.node
        return origin is not None and (node is None or origin != node.name)

    def bind(
        self, name: str, function: Any, *, version: int = 0, origin: str | None = None
    ) -> bool:
        """Bind ``name`` to ``function`` unless the user's own object holds the name.

        Args:
            version, origin: the function's version and the node that defined it, for
                notices.

        Returns:
            Whether the namespace changed.
        """
        if name in self.namespace and not self.owns(name):
            if name not in self._noticed:
                self._noticed.add(name)
                self.notice(
                    f"clustorage: {name!r} is taken in your namespace; "
                    f"the cluster's version is clustorage.functions.{name}"
                )
            return False
        self._noticed.discard(name)
        self._installed[name] = function
        held = self.namespace.get(name)
        if held is function:
            return False
        self.namespace[name] = function
        what = f"{name} v{version}" if version else name
        if origin is not None:
            what += f" from {origin}"
        if hasattr(builtins, name) and name not in self._shadowing:
            self._shadowing.add(name)
            self.notice(
                f"clustorage: {what} now shadows the built-in {name}; "
                f"builtins.{name} is the original"
            )
        elif held is not None and self.announce_rebinds and self._from_elsewhere(origin):
            self.notice(f"clustorage: {name} rebound to {what.removeprefix(name).strip()}")
        return True

    def unbind(self, name: str, *, origin: str | None = None) -> bool:
        """Remove ``name`` if it holds a cluster version; returns whether it did.

        Args:
            origin: the node that deleted the function, for the notice.
        """
        owned = self.owns(name)
        self._installed.pop(name, None)
        if not owned:
            return False
        del self.namespace[name]
        by = f" by {origin}" if origin is not None else ""
        if name in self._shadowing:
            self._shadowing.discard(name)
            self.notice(f"clustorage: {name} was deleted{by}; the built-in {name} is visible again")
        elif self.announce_rebinds and self._from_elsewhere(origin):
            self.notice(f"clustorage: {name} was deleted{by}")
        return True
