# mypy: disallow-subclassing-any=False, disallow-untyped-decorators=False
# mypy: disallow-untyped-calls=False
"""``%cluster_call``, ``%%cluster_call``, ``%cluster_functions``, ``%cluster_source``."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import line_cell_magic, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from clustorage import CompileError, Node, NotFound

from .base import ClusterMagics, Interrupted
from .display import SourceText, describe
from .parsing import check_function_name, check_no_option, expression, head, split_arguments

__all__ = ["FunctionMagics"]


@magics_class
class FunctionMagics(ClusterMagics):
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
        name, rest = head(line)
        check_no_option("cluster_call", name, "NAME [ARG ...]")
        parse_argstring(self.cluster_call, name)
        check_function_name(name)
        codes = [
            expression(source, f"argument {i}") for i, source in enumerate(split_arguments(rest), 1)
        ]
        node = self.session.node()
        if cell is not None:
            if not cell.strip():
                raise UsageError(
                    f"the cell is empty: write the source of {name}, as in def {name}(...):"
                )
            try:
                definition = node.define(name, cell, force=False)
            except CompileError as exc:
                raise self._in_cell(exc, line, cell) from None
            except KeyboardInterrupt:
                raise Interrupted(f"stopped waiting for the loader to define {name}") from None
            if definition.changed or not codes:
                print(describe(definition))
            self.session.sync.request(name)
            self.session.sync.apply()
            if not codes:
                return None
        args = [self.session.shell.ev(code) for code in codes]
        try:
            function = node.function(name)  # loaded here: a local call
        except NotFound:
            return self._fetch_and_call(node, name, args)
        return function(*args)

    def _in_cell(self, exc: CompileError, line: str, cell: str) -> CompileError:
        """``exc`` located in the cell being run: its line, numbered as the user sees it.

        The loader numbers lines from the source it compiled: the cell without its leading
        blank lines, dedented. The magic line is line 1 of the cell.
        """
        if exc.lineno is None:
            return exc
        lines = cell.splitlines()
        lead = next((i for i, text in enumerate(lines) if text.strip()), 0)
        index = lead + exc.lineno - 1
        if not 0 <= index < len(lines):
            return exc
        original = lines[index]
        offset = exc.offset
        if offset is not None and exc.text is not None:
            compiled = exc.text.rstrip("\n")
            dedented = len(original) - len(original.lstrip())
            dedented -= len(compiled) - len(compiled.lstrip())
            offset += max(dedented, 0)
        header = f"%%cluster_call {line.strip()}"
        shown = self.session.cell_file("cluster_call", cell, f"{header}\n{cell}")
        located = CompileError(
            exc.msg,
            name=exc.name,
            lineno=index + 2,
            offset=offset,
            text=original + "\n",
            cell=shown.label,
        )
        located.filename = shown.name  # IPython shows the cell's line and a caret from it
        return located

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
        name = check_function_name(args.name)
        return SourceText(self.session.node().source(name))
