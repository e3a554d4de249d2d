# mypy: disallow-subclassing-any=False, disallow-untyped-decorators=False
# mypy: disallow-untyped-calls=False
"""IPython magics: ``%load_ext clustorage`` (SPEC "IPython / Jupyter").

One class per topic, each magic parsing its line and making one call into the library:

- :class:`NodeMagics`: ``%cluster_start``, ``%cluster_stop``, ``%cluster_status``
- :class:`ValueMagics`: ``%cluster_get``, ``%%cluster_get``, ``%cluster_keys``, ``%cluster_delete``
- :class:`FunctionMagics`: ``%cluster_call``, ``%%cluster_call``, ``%cluster_functions``,
  ``%cluster_source``

They share one :class:`ClusterSession` per shell, which follows the process's default node,
binds hot-loaded functions into ``user_ns`` before each cell (a
:class:`~clustorage.namespace.NamespaceSync` applied on ``pre_run_cell``), and shows every
clustorage error as one line instead of a traceback. User mistakes raise ``UsageError``.
"""

from __future__ import annotations

import ast
import contextlib
import html
import io
import logging
import os
import sys
import time
import tokenize
import weakref
from collections.abc import Callable
from types import CodeType, TracebackType
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import (
    Magics,
    line_cell_magic,
    line_magic,
    magics_class,
    no_var_expand,
)
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

import clustorage

from . import ClustorageError, Definition, Node, NotFound
from .namespace import NamespaceSync

__all__ = [
    "ClusterSession",
    "ClusterStatus",
    "FunctionMagics",
    "NodeMagics",
    "SourceText",
    "ValueMagics",
    "load_ipython_extension",
    "session_for",
    "split_arguments",
    "unload_ipython_extension",
]

log = logging.getLogger(__name__)

NO_NODE = (
    "no clustorage node runs here: start one with %cluster_start --name NAME "
    "[--loader LOADER] (no --loader: this node is the loader)"
)

_sessions: weakref.WeakKeyDictionary[Any, ClusterSession] = weakref.WeakKeyDictionary()


# -- the session: one per shell -----------------------------------------------------------


class ClusterSession:
    """What the magics of one shell share: the node it follows and its namespace sync.

    Args:
        shell: the IPython ``InteractiveShell`` (a kernel's or a terminal's).

    Attributes:
        sync: the :class:`NamespaceSync` binding cluster functions into ``shell.user_ns``;
            a terminal front-end may set ``sync.wakeup`` to apply hot-loads before the next
            prompt instead of waiting for the next cell.
    """

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.sync = NamespaceSync(shell.user_ns)
        self.startup_error: str | None = None
        self._owns_custom_exc = False

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
        else:
            self.sync.attach(node)

    def autostart(self, env: dict[str, str] | None = None) -> Node | None:
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
                node = clustorage.start()
            except Exception as exc:
                self.startup_error = (
                    f"clustorage: this kernel's node did not start ({type(exc).__name__}: "
                    f"{exc}); start it with %cluster_start"
                )
                log.warning("%s", self.startup_error)
        self.follow(node)
        return node

    # -- shell hooks -----------------------------------------------------------------------

    def pre_run_cell(self, info: Any = None) -> None:
        """Before each cell: show a startup failure once, then apply queued hot-loads."""
        if self.startup_error is not None:
            print(self.startup_error, file=sys.stderr, flush=True)
            self.startup_error = None
        self.follow(clustorage.default_node())
        self.sync.apply()

    def install(self) -> None:
        """Register the magics, the ``pre_run_cell`` hook and the one-line error display.

        Also binds the name ``clustorage`` in ``user_ns`` unless it is taken.
        """
        shell = self.shell
        shell.register_magics(
            NodeMagics(shell, self), ValueMagics(shell, self), FunctionMagics(shell, self)
        )
        shell.events.register("pre_run_cell", self.pre_run_cell)
        if "clustorage" not in shell.user_ns:  # notices point at clustorage.functions.NAME
            shell.push({"clustorage": clustorage}, interactive=False)
        if not shell.custom_exceptions:  # leave someone else's handler alone
            shell.set_custom_exc((ClustorageError,), _show_one_line)
            self._owns_custom_exc = True

    def uninstall(self) -> None:
        """Undo :meth:`install`; the node keeps running and bound names stay."""
        shell = self.shell
        with contextlib.suppress(ValueError):
            shell.events.unregister("pre_run_cell", self.pre_run_cell)
        if self._owns_custom_exc:
            shell.set_custom_exc((), None)
            self._owns_custom_exc = False
        manager = shell.magics_manager
        for cls in (NodeMagics, ValueMagics, FunctionMagics):
            for kind, names in cls.magics.items():
                for name in names:
                    manager.magics[kind].pop(name, None)
            manager.registry.pop(cls.__name__, None)
        self.sync.detach()


def _show_one_line(
    shell: Any,
    etype: type[BaseException],
    value: BaseException,
    tb: TracebackType | None,
    tb_offset: int | None = None,
) -> list[str]:
    """Show a clustorage error as ``Type: message`` (``%tb`` still has the full traceback)."""
    stb = [f"{etype.__name__}: {value}"]
    shell._showtraceback(etype, value, stb)
    return stb


def session_for(shell: Any) -> ClusterSession | None:
    """The :class:`ClusterSession` of ``shell``, if the extension is loaded there."""
    return _sessions.get(shell)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext clustorage``: register the magics; start the node if the env says so."""
    if ipython in _sessions:
        return
    session = ClusterSession(ipython)
    _sessions[ipython] = session
    session.install()
    session.autostart()


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext clustorage``: remove the magics and hooks (the node keeps running)."""
    session = _sessions.pop(ipython, None)
    if session is not None:
        session.uninstall()


# -- parsing helpers ----------------------------------------------------------------------

_OPEN, _CLOSE = "([{", ")]}"
_SKIP = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


def split_arguments(text: str) -> list[str]:
    """Split ``text`` into Python expressions separated by spaces outside brackets and strings.

    >>> split_arguments("1 'a b' [x, y] f(2, 3) -4")
    ['1', "'a b'", '[x, y]', 'f(2, 3)', '-4']

    Raises:
        UsageError: ``text`` cannot be tokenized (an unclosed bracket or string).
    """
    text = text.strip()
    spans: list[list[int]] = []
    depth = 0
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type in _SKIP:
                continue
            if token.type == tokenize.COMMENT:
                break
            start, end = token.start[1], token.end[1]
            if spans and (depth > 0 or start == spans[-1][1]):
                spans[-1][1] = end
            else:
                spans.append([start, end])
            if token.type == tokenize.OP and token.string in _OPEN:
                depth += 1
            elif token.type == tokenize.OP and token.string in _CLOSE:
                depth = max(depth - 1, 0)
    except (tokenize.TokenError, SyntaxError) as exc:
        raise UsageError(f"cannot read the arguments {text!r}: {exc.args[0]}") from None
    return [text[start:end] for start, end in spans]


def _expression(source: str, what: str) -> CodeType:
    try:
        return compile(source, f"<{what}>", "eval")
    except SyntaxError as exc:
        raise UsageError(
            f"{what} {source!r} is not a Python expression ({exc.msg}); separate arguments "
            f"with spaces and put one that has spaces in parentheses, as in (x + 1)"
        ) from None


def _head(line: str) -> tuple[str, str]:
    """``"KEY rest of line"`` -> ``("KEY", "rest of line")``."""
    parts = line.strip().split(None, 1)
    return (parts[0] if parts else ""), (parts[1] if len(parts) > 1 else "")


def _check_function_name(name: str) -> str:
    if not name.isidentifier():
        raise UsageError(f"invalid function name {name!r}: use a Python identifier such as sum")
    return name


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def describe(definition: Definition) -> str:
    """One line about a definition: its version and where it is loaded."""
    name, version = definition.name, definition.version
    if not definition.changed:
        return f"{name} v{version} unchanged (same source)"
    where = ", ".join(definition.installed) or "no node"
    text = f"{name} v{version} loaded on {where}"
    if definition.missing:
        text += f"; not confirmed by {', '.join(definition.missing)}"
    return text


# -- display objects ----------------------------------------------------------------------


class SourceText(str):
    """A function's source: shown as code (Markdown in notebooks), not as a quoted string."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.rstrip("\n"))

    def _repr_markdown_(self) -> str:
        return f"```python\n{self.rstrip()}\n```"


def _duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


class ClusterStatus:
    """``%cluster_status``: a text table in terminals, an HTML table in notebooks.

    Args:
        status: what :meth:`Node.status` returned.
        now: the time to measure "connected for" against (default: now).
    """

    HEADER = ("node", "role", "address", "connected for")

    def __init__(self, status: dict[str, Any], now: float | None = None) -> None:
        self.status = status
        self.now = time.time() if now is None else now

    def summary(self) -> str:
        status = self.status
        state = "connected" if status.get("connected") else "not connected"
        verb = "is the loader" if status.get("role") == "loader" else "is a member"
        counts = f"{_plural(status.get('keys', 0), 'key')}, "
        counts += _plural(status.get("functions", 0), "function")
        return f"{status.get('name')} {verb} of {status.get('loader')} ({state}); {counts}"

    def rows(self) -> list[tuple[str, str, str, str]]:
        rows = []
        for entry in self.status.get("nodes", []):
            name = str(entry.get("name", "?"))
            if name == self.status.get("name"):
                name += " (this node)"
            since = entry.get("connected_since")
            rows.append(
                (
                    name,
                    str(entry.get("role", "")),
                    str(entry.get("address", "")),
                    _duration(self.now - since) if since else "",
                )
            )
        return rows

    def __repr__(self) -> str:
        lines = [self.summary()]
        rows = self.rows()
        if not rows:
            return "\n".join([*lines, "  (no nodes known: the loader does not answer)"])
        table = [self.HEADER, *rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(self.HEADER))]
        for row in table:
            lines.append(
                "  "
                + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            )
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def _repr_html_(self) -> str:
        esc = html.escape
        head = "".join(f"<th>{esc(cell)}</th>" for cell in self.HEADER)
        body = "".join(
            "<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>"
            for row in self.rows()
        )
        return (
            f'<table class="clustorage-status"><caption>{esc(self.summary())}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )


# -- magics -------------------------------------------------------------------------------


class _ClusterMagics(Magics):
    """Base: magics that share one :class:`ClusterSession`."""

    def __init__(self, shell: Any, session: ClusterSession) -> None:
        super().__init__(shell)
        self.session = session


@magics_class
class NodeMagics(_ClusterMagics):
    """Start, stop and inspect this process's node."""

    @magic_arguments()
    @argument("--name", "-n", help="this node's name (default: $CLUSTORAGE_NAME, or generated)")
    @argument(
        "--loader",
        "-l",
        metavar="NAME[@HOST[:PORT]]",
        help="the loader to join (default: $CLUSTORAGE_LOADER; none: this node is the loader)",
    )
    @argument("--cookie", help="the cluster's secret (default: $CLUSTORAGE_COOKIE, else file)")
    @argument("--cookie-file", metavar="FILE", help="read the secret from FILE (mode 0600)")
    @argument("--listen", metavar="HOST:PORT", help="where a loader listens (127.0.0.1:4370)")
    @argument("--data", metavar="DIR", help="a loader's data directory, or :memory:")
    @argument("--timeout", type=float, metavar="SECONDS", help="how long to wait for the loader")
    @line_magic
    def cluster_start(self, line: str) -> Node:
        """Start this kernel's node: join the loader's cluster, or be the loader.

        Without --loader (and without $CLUSTORAGE_LOADER) this node is the loader. Flags
        not given fall back to the CLUSTORAGE_* environment variables. Functions already in
        the cluster are bound into your namespace.

        In [1]: %cluster_start --name app2 --loader app1@127.0.0.1:4370
        Out[1]: <clustorage.Node app2 (member of app1@127.0.0.1:4370, connected)>
        """
        args = parse_argstring(self.cluster_start, line)
        running = clustorage.default_node()
        if running is not None:
            raise UsageError(
                f"this process already runs node {running.name!r} ({running.role} of "
                f"{running.loader_address}); run %cluster_stop first"
            )
        node = clustorage.start(
            name=args.name,
            loader=args.loader,
            cookie=args.cookie,
            cookie_file=args.cookie_file,
            listen=args.listen,
            data=args.data,
            timeout=args.timeout,
        )
        self.session.follow(node)
        self.session.sync.apply()
        return node

    @magic_arguments()
    @line_magic
    def cluster_stop(self, line: str) -> None:
        """Stop this kernel's node (a loader stops serving). Bound functions stay usable.

        In [1]: %cluster_stop
        stopped node app2
        """
        parse_argstring(self.cluster_stop, line)
        node = clustorage.default_node()
        if node is None:
            print("no clustorage node runs here")
            return
        self.session.follow(None)
        clustorage.stop()
        print(f"stopped node {node.name}")

    @magic_arguments()
    @line_magic
    def cluster_status(self, line: str) -> ClusterStatus:
        """The loader, every connected node (role, address, connected for), keys and functions.

        An HTML table in notebooks, a text table in terminals.

        In [1]: %cluster_status
        Out[1]:
        app2 is a member of app1@127.0.0.1:4370 (connected); 2 keys, 1 function
          node               role    address          connected for
          app1               loader  local            5m 02s
          app2 (this node)   member  127.0.0.1:51506  12s
        """
        parse_argstring(self.cluster_status, line)
        return ClusterStatus(self.session.node().status())


@magics_class
class ValueMagics(_ClusterMagics):
    """Values computed once for the whole cluster."""

    @magic_arguments()
    @argument("key", metavar="KEY", help="the value's key, e.g. dataset or user.42")
    @argument(
        "expr",
        nargs="*",
        metavar="EXPR",
        help="a Python expression (in your namespace) that computes the value on a miss",
    )
    @no_var_expand
    @line_cell_magic
    def cluster_get(self, line: str, cell: str | None = None) -> Any:
        """The cluster's value of KEY, computed once for the whole cluster on a miss.

        As a line magic, EXPR (the rest of the line) computes it; as a cell magic, the cell
        runs only on a miss and its last expression is the value. Values are not bound into
        your namespace: assign the result, or use clustorage.get(KEY).

        In [1]: %cluster_get answer 6 * 7
        Out[1]: 42

        In [2]: %%cluster_get dataset
           ...: import csv
           ...: list(csv.DictReader(open("trips.csv")))
        """
        __tracebackhide__ = True  # tracebacks start at the user's code, not here
        key, rest = _head(line)
        parse_argstring(self.cluster_get, key)
        fn: Callable[[], Any] | None = None
        if cell is not None:
            if rest:
                raise UsageError("%%cluster_get takes only KEY: the cell computes the value")
            fn = self._cell_function(f"%%cluster_get {line.strip()}", cell)
        elif rest:
            code = _expression(rest, "EXPR")
            fn = lambda: self.session.shell.ev(code)  # noqa: E731
        node = self.session.node()
        try:
            return node.get(key, fn)
        except NotFound:
            if fn is not None:
                raise
            raise NotFound(
                f"the cluster has no value for {key!r}; give an expression that computes it, "
                f"as in %cluster_get {key} EXPR"
            ) from None

    def _cell_function(self, header: str, cell: str) -> Callable[[], Any]:
        """The cell as a function: run its statements, return its last expression.

        Tracebacks show the whole cell, magic line included, with the cell's line numbers.
        """
        shell = self.session.shell
        code = shell.transform_cell(cell)
        try:
            tree = ast.parse(code)
        except SyntaxError as exc:
            line = (exc.lineno or 0) + 1
            raise UsageError(f"the cell is not valid Python: {exc.msg} (line {line})") from None
        ast.increment_lineno(tree, 1)
        if not tree.body or not isinstance(tree.body[-1], ast.Expr):
            raise UsageError(
                "the last line of a %%cluster_get cell must be an expression: "
                "its value is what the cluster stores"
            )
        filename = shell.compile.cache(
            f"{header}\n{code}", shell.execution_count, raw_code=f"{header}\n{cell}"
        )
        last = tree.body.pop()
        assert isinstance(last, ast.Expr)
        body = compile(tree, filename, "exec")
        value = compile(ast.Expression(last.value), filename, "eval")

        def compute() -> Any:
            __tracebackhide__ = True
            with shell.builtin_trap:
                exec(body, shell.user_global_ns, shell.user_ns)
                return eval(value, shell.user_global_ns, shell.user_ns)

        return compute

    @magic_arguments()
    @line_magic
    def cluster_keys(self, line: str) -> list[str]:
        """Every value key in the cluster, sorted.

        In [1]: %cluster_keys
        Out[1]: ['answer', 'dataset']
        """
        parse_argstring(self.cluster_keys, line)
        return self.session.node().keys()

    @magic_arguments()
    @argument("key", metavar="KEY", help="the value (or, with --function, function) to delete")
    @argument("--function", "-f", action="store_true", help="delete the function KEY instead")
    @line_magic
    def cluster_delete(self, line: str) -> None:
        """Delete a value (or, with --function, a function) on every node.

        In [1]: %cluster_delete answer
        deleted value 'answer'
        """
        args = parse_argstring(self.cluster_delete, line)
        kind = "function" if args.function else "value"
        if args.function:
            _check_function_name(args.key)
        existed = self.session.node().delete(args.key, kind=kind)
        self.session.sync.apply()
        print(f"deleted {kind} {args.key!r}" if existed else f"no {kind} {args.key!r} to delete")


@magics_class
class FunctionMagics(_ClusterMagics):
    """Functions defined once, compiled by the loader and hot-loaded into every node."""

    @magic_arguments()
    @argument("name", metavar="NAME", help="the function's name")
    @argument(
        "args",
        nargs="*",
        metavar="ARG",
        help="Python expressions (in your namespace), separated by spaces",
    )
    @no_var_expand
    @line_cell_magic
    def cluster_call(self, line: str, cell: str | None = None) -> Any:
        """Call cluster function NAME with ARGs; as a cell magic, define it first.

        Each ARG is a Python expression evaluated in your namespace; separate them with
        spaces and put one that has spaces in parentheses. As a cell magic the cell is the
        function's source (a def NAME block, or an expression such as lambda a, b: a + b):
        the loader compiles it and hot-loads it into every node, a new version only when
        the source changed; NAME is bound in your namespace (unless you use that name for
        something else), and the function is called if ARGs are given.

        In [1]: %%cluster_call add 1 4
           ...: def add(a, b):
           ...:     return a + b
        add v1 loaded on app1, app2
        Out[1]: 5

        In [2]: %cluster_call add 2 (x + 1)
        Out[2]: 13
        """
        __tracebackhide__ = True  # tracebacks start at the function's own source
        name, rest = _head(line)
        parse_argstring(self.cluster_call, name)
        _check_function_name(name)
        codes = [
            _expression(source, f"argument {i}")
            for i, source in enumerate(split_arguments(rest), 1)
        ]
        node = self.session.node()
        if cell is not None:
            if not cell.strip():
                raise UsageError(
                    f"the cell is empty: write the source of {name}, as in def {name}(...):"
                )
            definition = node.define(name, cell, force=False)
            self.session.sync.request(name)
            self.session.sync.apply()
            if definition.changed or not codes:
                print(describe(definition))
            if not codes:
                return None
        args = [self.session.shell.ev(code) for code in codes]
        try:
            function = node.function(name)  # loaded here: a local call
        except NotFound:
            return self._fetch_and_call(node, name, args)
        return function(*args)

    def _fetch_and_call(self, node: Node, name: str, args: list[Any]) -> Any:
        __tracebackhide__ = True
        try:
            return node.call(name, args)
        except NotFound:
            if name in node.functions():
                raise
            raise NotFound(
                f"the cluster has no function {name!r}; define it in a cell that starts with "
                f"%%cluster_call {name}"
            ) from None

    @magic_arguments()
    @line_magic
    def cluster_functions(self, line: str) -> list[str]:
        """Every function name in the cluster, sorted.

        In [1]: %cluster_functions
        Out[1]: ['add', 'fahrenheit']
        """
        parse_argstring(self.cluster_functions, line)
        return self.session.node().functions()

    @magic_arguments()
    @argument("name", metavar="NAME", help="the function's name")
    @line_magic
    def cluster_source(self, line: str) -> SourceText:
        """The source of cluster function NAME, as the loader compiled it.

        In [1]: %cluster_source add
        Out[1]:
        def add(a, b):
            return a + b
        """
        args = parse_argstring(self.cluster_source, line)
        name = _check_function_name(args.name)
        return SourceText(self.session.node().source(name))
