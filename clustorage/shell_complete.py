"""Completion of cluster keys and function names in the terminal shell.

Python names come from IPython's own completer; this adds what only the cluster knows:
``get('he<TAB>`` and ``%cluster_get he<TAB>`` offer value keys, ``call('su<TAB>``,
``%cluster_call su<TAB>`` and ``%cluster_source su<TAB>`` offer function names, and a bare
``su<TAB>`` offers loaded functions too. It reads the shell's cached lists, never the network.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

__all__ = ["ClusterMatcher", "Completions", "cluster_completions"]

_PARTIAL = r"(?P<partial>[^\s'\"()]*)$"
_KEY_CONTEXT = re.compile(
    r"(?:\b(?:get|put|delete)\(\s*['\"]|%{1,2}cluster_(?:get|delete)\s+)" + _PARTIAL
)
_FUNCTION_CONTEXT = re.compile(
    r"(?:\b(?:call|define|source|function)\(\s*['\"]|%{1,2}cluster_(?:call|source)\s+)" + _PARTIAL
)
_NAME_CONTEXT = re.compile(r"(?:^|[^\w.'\"%])(?P<partial>[A-Za-z_]\w*)$")


class Completions(NamedTuple):
    """The text being completed, the full names it can become, and what they are."""

    partial: str
    names: list[str]
    kind: str
    exclusive: bool  # only these make sense here (inside a key or function-name argument)


def cluster_completions(line: str, keys: Sequence[str], functions: Sequence[str]) -> Completions:
    """What the text before the cursor can complete to, among cluster keys and functions.

    Args:
        line: the current line up to the cursor.
        keys, functions: the cluster's value keys and function names.
    """
    contexts = ((_KEY_CONTEXT, keys, "key"), (_FUNCTION_CONTEXT, functions, "function"))
    for pattern, names, kind in contexts:
        match = pattern.search(line)
        if match:
            partial = match["partial"]
            return Completions(partial, [n for n in names if n.startswith(partial)], kind, True)
    match = _NAME_CONTEXT.search(line)
    if match:
        partial = match["partial"]
        return Completions(
            partial, [n for n in functions if n.startswith(partial)], "function", False
        )
    return Completions("", [], "", False)


class ClusterMatcher:
    """An IPython completion matcher (API v2) over the shell's cached keys and functions."""

    matcher_api_version = 2
    matcher_priority = 100
    matcher_identifier = "clustorage"

    def __init__(self, names: Callable[[], tuple[Sequence[str], Sequence[str]]]) -> None:
        self._names = names
        self.__qualname__ = "ClusterMatcher"

    def __call__(self, context: Any) -> dict[str, Any]:
        from IPython.core.completer import SimpleCompletion

        keys, functions = self._names()
        found = cluster_completions(context.text_until_cursor, keys, functions)
        token: str = context.token
        if not found.names or not found.partial.endswith(token):
            return {"completions": [], "suppress": False}
        # IPython replaces its own token (its split of the line): keep what precedes it.
        head = len(found.partial) - len(token)
        return {
            "completions": [SimpleCompletion(n[head:], type=found.kind) for n in found.names],
            "matched_fragment": token,
            "suppress": found.exclusive,
        }
