"""A member (or loader) process driven line by line from a test, like a user at a shell.

Each stdin line is a JSON string of Python source, run in a namespace holding ``node``
and ``clustorage``; the last expression's value is printed as one JSON line:
``{"ok": value}`` or ``{"error": "ExceptionName", "message": "..."}``.
The node is configured by the CLUSTORAGE_* environment variables.
"""

from __future__ import annotations

import ast
import json
import logging
import signal
import sys
import traceback
from typing import Any

import clustorage


def run(source: str, namespace: dict[str, Any]) -> Any:
    tree = ast.parse(source)
    last = tree.body[-1] if tree.body else None
    if isinstance(last, ast.Expr):
        exec(compile(ast.Module(tree.body[:-1], []), "<driver>", "exec"), namespace)
        return eval(compile(ast.Expression(last.value), "<driver>", "eval"), namespace)
    exec(compile(tree, "<driver>", "exec"), namespace)
    return None


def main() -> None:
    # Ctrl-C is Python's, as in a terminal, even where the tests were started in the
    # background (a shell then has it ignored, and Python keeps that).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(threadName)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("clustorage").setLevel(logging.DEBUG)  # reconnects too, for post-mortems
    try:
        node = clustorage.start()
    except clustorage.ClustorageError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
        return
    namespace: dict[str, Any] = {"node": node, "clustorage": clustorage}
    print(json.dumps({"ok": node.name}), flush=True)
    for line in sys.stdin:
        try:
            result = {"ok": run(json.loads(line), namespace)}
        except BaseException as exc:
            result = {
                "error": type(exc).__name__,
                "message": str(exc),
                "traceback": traceback.format_exc(),
            }
        print(json.dumps(result, default=repr), flush=True)
    clustorage.stop()


if __name__ == "__main__":
    main()
