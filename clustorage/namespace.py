"""Hot-loaded cluster functions, bound into a user namespace between cells.

A node tells its ``on_load`` listeners about every install from a background thread, but a
user namespace (an IPython ``user_ns``, a shell's globals) belongs to the thread that runs the
user's code. :class:`NamespaceSync` therefore only *queues* names on the background thread;
the owner calls :meth:`NamespaceSync.apply` between cells (IPython's ``pre_run_cell`` event,
or a prompt loop's callback) and the names are bound there. Nothing is printed from the
background thread, so no output lands in whichever cell ran last.

Binding never clobbers the user's own objects (SPEC "call" 8): a name is (re)bound only if it
is absent or holds a cluster version of that function; otherwise it is left alone and a one-line
notice says where the cluster's version is. Values are never bound, only functions.

>>> sync = NamespaceSync(shell.user_ns)
>>> sync.attach(clustorage.default_node())
>>> shell.events.register("pre_run_cell", lambda info: sync.apply())
"""

from __future__ import annotations

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

    Thread safety: :meth:`queue` (the ``on_load`` listener) may run on any thread; every other
    method belongs to the namespace's owner thread.
    """

    def __init__(
        self,
        namespace: MutableMapping[str, Any],
        *,
        notice: Callable[[str], None] | None = None,
        wakeup: Callable[[], None] | None = None,
    ) -> None:
        self.namespace = namespace
        self.notice = notice or _print_notice
        self.wakeup = wakeup
        self.node: Node | None = None
        self._pending: dict[str, None] = {}  # an ordered set of names to look at
        self._lock = threading.Lock()
        self._installed: dict[str, Any] = {}  # name -> the object this sync bound
        self._noticed: set[str] = set()
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
                self._pending[name] = None

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
            self._pending[event.key] = None
        wakeup = self.wakeup
        if wakeup is not None:
            wakeup()

    def request(self, name: str) -> None:
        """Queue ``name`` to be looked at on the next :meth:`apply`."""
        with self._lock:
            self._pending[name] = None

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
            names, self._pending = list(self._pending), {}
        node = self.node
        if node is None:
            return []
        changed = []
        for name in names:
            try:
                function = node.function(name)
            except KeyError:  # removed from the cluster (NotFound is a KeyError)
                if self.unbind(name):
                    changed.append(name)
            else:
                if self.bind(name, function):
                    changed.append(name)
        return changed

    def owns(self, name: str) -> bool:
        """Whether ``namespace[name]`` holds a cluster version of function ``name``."""
        held = self.namespace.get(name)
        return held is not None and (
            held is self._installed.get(name) or is_cluster_function(held, name)
        )

    def bind(self, name: str, function: Any) -> bool:
        """Bind ``name`` to ``function`` unless the user's own object holds the name.

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
        if self.namespace.get(name) is function:
            return False
        self.namespace[name] = function
        return True

    def unbind(self, name: str) -> bool:
        """Remove ``name`` if it holds a cluster version; returns whether it did."""
        owned = self.owns(name)
        self._installed.pop(name, None)
        if owned:
            del self.namespace[name]
        return owned
