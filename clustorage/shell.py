"""``clustorage-shell``: a Python REPL that is a node of a cluster (SPEC "Terminal").

::

    $ clustorage-shell --name app2 --loader app1
    app2> get('hello', lambda: 'world')
    'world'
    app2> call('sum', [1, 4], lambda: "def sum(a, b):\\n    return a + b\\n")
    5

The node starts first (a wrong cookie or a clashing name is one line on stderr and exit
status 1, a bad flag exit status 2); then IPython's terminal machinery, dressed by
:mod:`clustorage.shell_ui`, reads and runs code until Ctrl-D, which stops the node and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import termios
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import clustorage
from clustorage import ClustorageError, ConfigError, Node
from clustorage.flags import add_node_flags, check_listen, is_loader, member_hint, node_options

__all__ = ["build_shell", "main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clustorage-shell",
        description="A Python shell that is a node of a Clustorage cluster: get() a value "
        "computed once for everyone, call() a function defined once and hot-loaded everywhere.",
        epilog="Every flag falls back to its environment variable (CLUSTORAGE_NAME, "
        "CLUSTORAGE_LOADER, CLUSTORAGE_COOKIE, CLUSTORAGE_LISTEN, CLUSTORAGE_DATA). "
        "Without a loader (or with a loader named like this node), this shell is the loader. "
        "Ctrl-D leaves.",
    )
    add_node_flags(
        parser,
        name="this node's name, also the prompt (default: $CLUSTORAGE_NAME, else generated)",
        loader="join the cluster of this loader (default: $CLUSTORAGE_LOADER, else be the loader)",
        listen=True,
        data="the loader's SQLite directory, or :memory: for none; a loader's option only "
        "(default: $CLUSTORAGE_DATA, else ~/.clustorage/data)",
    )
    return parser


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that would be ignored, and a listen address a loader cannot use, before
    anything is created (SPEC "Terminal")."""
    if is_loader(args.name, args.loader):
        check_listen(args.listen, args.name, args.loader)
    elif args.data:
        loader = args.loader or "$CLUSTORAGE_LOADER"
        raise ConfigError(
            f"--data is a loader's option, and this shell is a member of {loader}, whose "
            "loader keeps the store; drop --data here, or give it to the loader"
        )


def _config(name: str) -> Any:
    from traitlets.config import Config

    config = Config()
    config.TerminalInteractiveShell.confirm_exit = False
    config.TerminalInteractiveShell.term_title_format = f"{name} (clustorage)"
    config.InteractiveShell.separate_in = ""
    config.InteractiveShell.xmode = "Plain"  # tracebacks as Python prints them
    config.HistoryManager.hist_file = ":memory:"  # input history: ~/.clustorage/history/NAME
    return config


def build_shell(node: Node) -> Any:
    """The process's IPython shell for ``node``: namespace, magics, toolbar and notices."""
    from .shell_ui import ClusterShell

    shell = ClusterShell.instance(cluster_name=node.name, config=_config(node.name))
    try:
        assert shell.extension_manager is not None
        shell.extension_manager.load_extension("clustorage")
    except Exception as exc:  # the shell stays usable without its magics
        print(f"[cluster] the %cluster_* magics are unavailable: {exc}", file=sys.stderr)
    shell.attach(node)
    return shell


def _banner(node: Node) -> str:
    from .shell_ui import count, snapshot

    snap = snapshot(node)
    if node.is_loader:
        host, port = node.address
        where = (
            f"the loader, on {host}:{port}; members join with {member_hint(node.name, host, port)}"
        )
    else:
        where = f"member of {node.loader_address}"
    counts = ", ".join(
        count(len(items), what)
        for items, what in ((snap.nodes, "node"), (snap.keys, "key"), (snap.functions, "function"))
    )
    return (
        f"Clustorage shell: {node.name}, {where} ({counts}).\n"
        "get(key, fn), call(name, args, fn), node, %cluster_status; Ctrl-D leaves."
    )


SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class _Leave:
    """SIGTERM/SIGHUP (``kill``, a closed terminal, ``tmux kill-session``): stop and exit.

    Raising SystemExit from a signal handler can land inside prompt_toolkit's event loop,
    which then waits forever for tasks that need the (gone) terminal. So the handler only
    starts a thread that stops the node (bounded), puts the terminal back and exits.
    Everything acknowledged is already stored (the loader commits before it acknowledges),
    and history is written line by line.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.terminal: list[Any] | None = None
        if sys.stdin.isatty():
            with contextlib.suppress(termios.error, OSError):
                self.terminal = termios.tcgetattr(sys.stdin.fileno())
        for signum in SIGNALS:
            signal.signal(signum, self)

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        for other in SIGNALS:
            signal.signal(other, signal.SIG_IGN)
        threading.Thread(target=self._exit, args=(128 + signum,), daemon=True).start()

    def _exit(self, status: int) -> None:
        stopper = threading.Thread(target=self.node.stop, daemon=True)
        stopper.start()
        stopper.join(3.0)
        with contextlib.suppress(termios.error, OSError):
            if self.terminal is not None:
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, self.terminal)
            # Bracketed paste off, cursor on, a fresh line, the toolbar below it erased.
            os.write(1, b"\x1b[?2004l\x1b[?25h\r\n\x1b[J")
        os._exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the shell; returns the exit status (0 after Ctrl-D)."""
    args = _parser().parse_args(argv)
    try:
        _check_flags(args)
        node = clustorage.start(args.name, args.loader, **node_options(args))
    except ConfigError as exc:
        print(f"clustorage-shell: {exc}", file=sys.stderr)
        return 2
    except ClustorageError as exc:
        print(f"clustorage-shell: {exc}", file=sys.stderr)
        return 1
    _Leave(node)
    try:
        shell = build_shell(node)
        print(_banner(node), flush=True)
        shell.mainloop()
        shell.close()
    finally:
        clustorage.stop()
    print(f"{node.name} left the cluster.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
