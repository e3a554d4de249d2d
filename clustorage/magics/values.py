# mypy: disallow-subclassing-any=False, disallow-untyped-decorators=False
# mypy: disallow-untyped-calls=False
"""``%cluster_get``, ``%%cluster_get``, ``%cluster_keys``, ``%cluster_delete``: values."""

from __future__ import annotations

import ast
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import line_cell_magic, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from clustorage import NotFound

from .base import ClusterMagics, Interrupted
from .parsing import check_function_name, check_no_option, expression, key_head
from .waiting import WaitLine

__all__ = ["ValueMagics"]


@magics_class
class ValueMagics(ClusterMagics):
    """Values computed once for the whole cluster."""

    @magic_arguments()
    @argument("key", metavar="KEY", help="the value's key, e.g. dataset or user.42")
    @argument(
        "expr",
        nargs="*",
        metavar="EXPR",
        help="optional: a Python expression (in your namespace) that computes the value on a miss",
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
        key, rest, quoted = key_head(line)
        if not key:
            raise UsageError(
                "%cluster_get needs a KEY: %cluster_get KEY [EXPR], where the optional EXPR "
                "computes the value on a miss (or use %%cluster_get KEY with a cell)"
            )
        if not quoted:  # -h and --help
            check_no_option("cluster_get", key, "KEY [EXPR]")
            parse_argstring(self.cluster_get, key)
        fn: Callable[[], Any] | None = None
        if cell is not None:
            if rest:
                raise UsageError("%%cluster_get takes only KEY: the cell computes the value")
            fn = self._cell_function(line, cell)
        elif rest:
            code = expression(rest, "EXPR")
            fn = lambda: self.session.shell.ev(code)  # noqa: E731
        node = self.session.node()
        computing = False

        def compute() -> Any:
            nonlocal computing
            __tracebackhide__ = True
            assert fn is not None
            computing = True
            value = fn()
            computing = False  # still True if fn was interrupted
            return value

        wait = WaitLine(self.session.shell, node, key)
        try:
            with wait:
                return node.get(key, None if fn is None else compute)
        except KeyboardInterrupt:
            if computing:  # in the user's own code: their traceback
                raise
            by = f", which {wait.holder} is computing" if wait.holder else ""
            raise Interrupted(f"stopped waiting for the value of {key!r}{by}") from None
        except NotFound:
            if fn is not None:
                raise
            raise NotFound(
                f"the cluster has no value for {key!r}; give an expression that computes it, "
                f"as in %cluster_get {key} EXPR"
            ) from None

    def _cell_function(self, line: str, cell: str) -> Callable[[], Any]:
        """The cell as a function: run its statements, return its last expression.

        Tracebacks name the cell being run (``Cell In[N]``) and show its lines, magic line
        included, with the cell's line numbers.
        """
        shell = self.session.shell
        header = f"%%cluster_get {line.strip()}"
        code = shell.transform_cell(cell)
        try:
            tree = ast.parse(code)
        except SyntaxError as exc:
            number = (exc.lineno or 0) + 1
            raise UsageError(f"the cell is not valid Python: {exc.msg} (line {number})") from None
        ast.increment_lineno(tree, 1)
        if not tree.body or not isinstance(tree.body[-1], ast.Expr):
            raise UsageError(
                "the last line of a %%cluster_get cell must be an expression: "
                "its value is what the cluster stores"
            )
        filename = self.session.cell_file("cluster_get", cell, f"{header}\n{code}").name
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
            check_function_name(args.key)
        node = self.session.node()
        existed = node.delete(args.key, kind=kind)
        if existed:
            print(f"deleted {kind} {args.key!r}")
        elif not args.function and args.key in node.functions():
            print(
                f"no value {args.key!r} to delete; a function has that name: "
                f"%cluster_delete --function {args.key}"
            )
        else:
            print(f"no {kind} {args.key!r} to delete")
        self.session.sync.apply()
