"""The %cluster_* magics on a real IPython shell, against a real (in-process) loader."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import COOKIE
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

import clustorage
from clustorage.magics import (
    ClusterStatus,
    SourceText,
    load_ipython_extension,
    session_for,
    split_arguments,
    unload_ipython_extension,
)
from clustorage.namespace import NamespaceSync, is_cluster_function

pytestmark = pytest.mark.timeout(30)

LINE_MAGICS = {
    "cluster_start",
    "cluster_get",
    "cluster_call",
    "cluster_status",
    "cluster_keys",
    "cluster_functions",
    "cluster_source",
    "cluster_delete",
    "cluster_stop",
}
CELL_MAGICS = {"cluster_get", "cluster_call"}


@pytest.fixture
def shell(home: Path, tmp_path: Path) -> Iterator[InteractiveShell]:
    """A fresh IPython shell (history in memory) with the extension loaded."""
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    ip = InteractiveShell(config=config, ipython_dir=str(tmp_path / "ipython"))
    load_ipython_extension(ip)
    try:
        yield ip
    finally:
        unload_ipython_extension(ip)
        clustorage.stop()


@pytest.fixture
def hub(home: Path) -> Iterator[clustorage.Node]:
    """A real loader in this process, on a free port."""
    with clustorage.Node("hub", cookie=COOKIE, listen="127.0.0.1:0", data=":memory:") as node:
        yield node


@pytest.fixture
def member(shell: InteractiveShell, hub: clustorage.Node) -> clustorage.Node:
    """The shell's node, a member of ``hub`` started with %cluster_start."""
    node = shell.run_line_magic("cluster_start", f"--name nb --loader {hub.loader_address}")
    assert isinstance(node, clustorage.Node)
    return node


@pytest.fixture
def peer(hub: clustorage.Node) -> Iterator[clustorage.Node]:
    """Another member of ``hub``: the "other kernel" that defines things."""
    with clustorage.Node("peer", hub.loader_address, cookie=COOKIE) as node:
        yield node


def cell(
    shell: InteractiveShell, code: str, capsys: pytest.CaptureFixture[str]
) -> tuple[Any, str, str]:
    """Run ``code`` as a cell; returns its ExecutionResult, stdout (less Out[N]) and stderr."""
    capsys.readouterr()
    result = shell.run_cell(code)
    out, err = capsys.readouterr()
    return result, re.sub(r"(?m)^Out\[\d+\]: .*\n", "", out), err


# -- registration and startup -------------------------------------------------------------


def test_load_ext_registers_every_magic_with_help(shell: InteractiveShell) -> None:
    """Every magic of the SPEC table is registered, with %magic? help showing an example."""
    magics = shell.magics_manager.magics
    assert set(magics["line"]) >= LINE_MAGICS
    assert set(magics["cell"]) >= CELL_MAGICS
    for name in LINE_MAGICS:
        doc = magics["line"][name].__doc__
        assert "In [1]: %" in doc, name
        assert f"%{name}" in doc, name


def test_load_ext_without_env_starts_no_node(shell: InteractiveShell) -> None:
    """Neither CLUSTORAGE_NAME nor CLUSTORAGE_LOADER: nothing starts until %cluster_start."""
    assert clustorage.default_node() is None
    with pytest.raises(UsageError, match="%cluster_start"):
        shell.run_line_magic("cluster_status", "")


def test_load_ext_with_only_a_name_starts_a_loader(
    shell: InteractiveShell, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only CLUSTORAGE_NAME set: %load_ext makes this node the loader."""
    unload_ipython_extension(shell)
    monkeypatch.setenv("CLUSTORAGE_NAME", "solo")
    monkeypatch.setenv("CLUSTORAGE_LISTEN", "127.0.0.1:0")
    monkeypatch.setenv("CLUSTORAGE_DATA", ":memory:")
    shell.run_line_magic("load_ext", "clustorage")
    node = clustorage.default_node()
    assert node is not None and node.name == "solo" and node.role == "loader"


def test_load_ext_with_a_loader_joins_under_a_generated_name(
    shell: InteractiveShell, hub: clustorage.Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CLUSTORAGE_LOADER set and no name: %load_ext joins as a member with a unique name."""
    hub.define("tripled", "def tripled(x):\n    return 3 * x\n")
    unload_ipython_extension(shell)
    monkeypatch.setenv("CLUSTORAGE_LOADER", hub.loader_address)
    load_ipython_extension(shell)
    node = clustorage.default_node()
    assert node is not None and node.role == "member" and node.name != "hub"
    assert shell.run_cell("tripled(2)").result == 6


def test_load_ext_failure_is_one_line_before_the_first_cell(
    shell: InteractiveShell, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A node that cannot start never breaks the shell; the first cell says why, once."""
    unload_ipython_extension(shell)
    monkeypatch.setenv("CLUSTORAGE_NAME", "bad name!")
    load_ipython_extension(shell)
    assert clustorage.default_node() is None
    _, _, err = cell(shell, "1", capsys)
    assert err.count("\n") == 1 and "ConfigError" in err and "%cluster_start" in err
    _, _, err = cell(shell, "2", capsys)
    assert err == ""


def test_cluster_start_as_member_binds_existing_functions(
    shell: InteractiveShell, hub: clustorage.Node
) -> None:
    """%cluster_start returns the node and binds the cluster's functions at once."""
    hub.define("halved", "lambda x: x / 2")
    node = shell.run_line_magic("cluster_start", f"--name nb --loader {hub.loader_address}")
    assert node.role == "member" and node.connected
    assert shell.user_ns["halved"](5) == 2.5


def test_cluster_start_twice_is_a_usage_error(
    shell: InteractiveShell, member: clustorage.Node
) -> None:
    """A second %cluster_start says which node runs and how to stop it."""
    with pytest.raises(UsageError, match="%cluster_stop"):
        shell.run_line_magic("cluster_start", "--name other")


def test_cluster_start_bad_flag_is_a_usage_error(shell: InteractiveShell) -> None:
    """An unknown flag is a UsageError, not a traceback."""
    with pytest.raises(UsageError):
        shell.run_line_magic("cluster_start", "--nmae x")


# -- values -------------------------------------------------------------------------------


def test_cluster_get_line_evaluates_expr_in_user_ns_once(
    shell: InteractiveShell, member: clustorage.Node, peer: clustorage.Node
) -> None:
    """EXPR runs in the user namespace on a miss only; every node gets that one value."""
    shell.run_cell("calls = []\nx = 6")
    for _ in range(2):
        value = shell.run_line_magic("cluster_get", "answer calls.append(1) or x * 7")
        assert value == 42
    assert shell.user_ns["calls"] == [1]
    assert peer.get("answer") == 42
    assert "answer" not in shell.user_ns  # values are not bound


def test_cluster_get_expression_with_braces_is_not_expanded(
    shell: InteractiveShell, member: clustorage.Node
) -> None:
    """EXPR is Python: dict literals and f-strings are not IPython {var} expansions."""
    shell.run_cell("who = 'nb'")
    assert shell.run_cell("%cluster_get d {'a': f'{who}!'}").result == {"a": "nb!"}


def test_cluster_get_cell_runs_only_on_a_miss(
    shell: InteractiveShell, member: clustorage.Node, peer: clustorage.Node
) -> None:
    """%%cluster_get: the cell runs on a miss and its last expression is the value."""
    code = "%%cluster_get table\nruns = globals().get('runs', 0) + 1\n[n * n for n in range(4)]"
    assert shell.run_cell(code).result == [0, 1, 4, 9]
    assert shell.run_cell(code).result == [0, 1, 4, 9]
    assert shell.user_ns["runs"] == 1
    assert peer.get("table") == [0, 1, 4, 9]


def test_cluster_get_cell_error_is_a_normal_traceback_and_stores_nothing(
    shell: InteractiveShell, member: clustorage.Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """An exception in the user's cell is the user's: full traceback, nothing stored."""
    result, out, _ = cell(shell, "%%cluster_get broken\n1 / 0", capsys)
    assert isinstance(result.error_in_exec, ZeroDivisionError)
    assert "Traceback" in out
    assert member.keys() == []


def test_cluster_get_cell_needs_a_last_expression(
    shell: InteractiveShell, member: clustorage.Node
) -> None:
    """A cell that ends in a statement has no value to store: UsageError."""
    with pytest.raises(UsageError, match="last line"):
        shell.run_cell_magic("cluster_get", "k", "x = 1\n")


def test_cluster_get_miss_without_expr_is_one_line(
    shell: InteractiveShell, member: clustorage.Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """A miss with no EXPR: one line that says how to give one, no traceback."""
    result, out, _ = cell(shell, "%cluster_get nothing.here", capsys)
    assert isinstance(result.error_in_exec, clustorage.NotFound)
    assert out.strip().splitlines() == [
        "NotFound: the cluster has no value for 'nothing.here'; give an expression that "
        "computes it, as in %cluster_get nothing.here EXPR"
    ]


def test_keys_and_delete(
    shell: InteractiveShell, member: clustorage.Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """%cluster_keys lists values; %cluster_delete removes one everywhere."""
    shell.run_line_magic("cluster_get", "a 1")
    shell.run_line_magic("cluster_get", "b.c 2")
    assert shell.run_line_magic("cluster_keys", "") == ["a", "b.c"]
    _, out, _ = cell(shell, "%cluster_delete a", capsys)
    assert out == "deleted value 'a'\n"
    _, out, _ = cell(shell, "%cluster_delete a", capsys)
    assert out == "no value 'a' to delete\n"
    assert shell.run_line_magic("cluster_keys", "") == ["b.c"]


# -- functions ----------------------------------------------------------------------------


def test_split_arguments() -> None:
    """ARGs split at spaces outside brackets and strings; comments end the line."""
    assert split_arguments("1 'a b' [x, y] f(2, 3) -4 {'k': (1, 2)} # note") == [
        "1",
        "'a b'",
        "[x, y]",
        "f(2, 3)",
        "-4",
        "{'k': (1, 2)}",
    ]
    assert split_arguments("") == []
    with pytest.raises(UsageError):
        split_arguments("f(1, 2")


def test_cluster_call_cell_defines_binds_and_calls(
    shell: InteractiveShell,
    member: clustorage.Node,
    peer: clustorage.Node,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """%%cluster_call NAME ARGS: defines (once), binds NAME here, calls with the ARGs."""
    source = "%%cluster_call add 1 (2 + 2)\ndef add(a, b):\n    return a + b\n"
    result, out, _ = cell(shell, source, capsys)
    assert result.result == 5
    assert re.fullmatch(r"add v1 loaded on .*\n", out) and "peer" in out and "nb" in out
    assert shell.run_cell("add(10, 1)").result == 11
    assert peer.call("add", [2, 3]) == 5
    result, out, _ = cell(shell, source, capsys)  # unchanged source: no new version, no noise
    assert result.result == 5 and out == ""
    assert member.history("add")[-1].version == 1
    _, out, _ = cell(shell, "%%cluster_call add\ndef add(a, b):\n    return a - b\n", capsys)
    assert out.startswith("add v2 loaded on")
    assert shell.run_cell("add(10, 1)").result == 9
    assert peer.call("add", [10, 1]) == 9


def test_cluster_call_line_evaluates_args_in_user_ns(
    shell: InteractiveShell, member: clustorage.Node, peer: clustorage.Node
) -> None:
    """%cluster_call NAME ARG...: each ARG is a Python expression in the user namespace."""
    peer.define("join", "def join(*parts):\n    return '|'.join(map(str, parts))\n")
    shell.run_cell("x = 41")
    assert shell.run_cell("%cluster_call join 'a b' (x + 1) [1, 2]").result == "a b|42|[1, 2]"


def test_cluster_call_unknown_function_is_one_line(
    shell: InteractiveShell, member: clustorage.Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """Calling a function nobody defined: one line saying how to define it."""
    result, out, _ = cell(shell, "%cluster_call nobody 1", capsys)
    assert isinstance(result.error_in_exec, clustorage.NotFound)
    assert out.count("\n") == 1 and "%%cluster_call nobody" in out


def test_cluster_call_bad_argument_is_a_usage_error(
    shell: InteractiveShell, member: clustorage.Node
) -> None:
    """An ARG that is not an expression is the user's mistake: UsageError naming it."""
    with pytest.raises(UsageError, match="argument 2 '-'"):
        shell.run_line_magic("cluster_call", "f 1 - 2")
    with pytest.raises(UsageError, match="invalid function name"):
        shell.run_line_magic("cluster_call", "not-a-name")


def test_compile_error_is_one_line_and_loads_nothing(
    shell: InteractiveShell,
    member: clustorage.Node,
    peer: clustorage.Node,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Bad cell source: CompileError as one line with <cluster:NAME>, nothing loaded."""
    result, out, _ = cell(shell, "%%cluster_call broken\ndef broken(:\n    pass\n", capsys)
    assert isinstance(result.error_in_exec, clustorage.CompileError)
    assert out.strip().splitlines() == [
        "CompileError: invalid syntax (<cluster:broken>, line 1, column 12)"
    ]
    assert "broken" not in member.functions() and "broken" not in peer.functions()
    assert "broken" not in shell.user_ns


def test_error_in_a_cluster_function_shows_its_source_not_the_magic(
    shell: InteractiveShell, member: clustorage.Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """A function that raises: the traceback shows its <cluster:NAME> lines, not magic code."""
    code = "%%cluster_call fails 1\ndef fails(x):\n    return x / 0\n"
    result, out, _ = cell(shell, code, capsys)
    assert isinstance(result.error_in_exec, ZeroDivisionError)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert "<cluster:fails>" in plain and "return x / 0" in plain
    assert "magics.py" not in plain


def test_cluster_get_cell_syntax_error_names_the_cell_line(
    shell: InteractiveShell, member: clustorage.Node
) -> None:
    """A syntax error in a %%cluster_get cell is a UsageError with the cell's line number."""
    with pytest.raises(UsageError, match=r"line 3\)"):
        shell.run_cell_magic("cluster_get", "k", "x = 1\ny = 1 /\nx\n")


def test_functions_and_source(shell: InteractiveShell, member: clustorage.Node) -> None:
    """%cluster_functions lists names; %cluster_source shows the source as code."""
    shell.run_cell("%%cluster_call sq\ndef sq(x):\n    return x * x\n")
    assert shell.run_line_magic("cluster_functions", "") == ["sq"]
    source = shell.run_line_magic("cluster_source", "sq")
    assert isinstance(source, SourceText) and "return x * x" in source
    assert source._repr_markdown_().startswith("```python\ndef sq(x):")


def test_delete_function_unbinds_it(shell: InteractiveShell, member: clustorage.Node) -> None:
    """%cluster_delete --function removes the function and the name this shell bound."""
    shell.run_cell("%%cluster_call gone\ndef gone():\n    return 1\n")
    assert "gone" in shell.user_ns
    shell.run_line_magic("cluster_delete", "--function gone")
    assert "gone" not in shell.user_ns and "gone" not in member.functions()


# -- hot-loads into the namespace ---------------------------------------------------------


def test_hot_load_is_applied_before_the_next_cell_and_prints_nothing(
    shell: InteractiveShell,
    member: clustorage.Node,
    peer: clustorage.Node,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A function defined elsewhere is bound before the next cell runs, silently."""
    capsys.readouterr()
    peer.define("inc", "def inc(x):\n    return x + 1\n")
    assert capsys.readouterr() == ("", "")  # nothing printed from the background thread
    assert "inc" not in shell.user_ns
    result, out, err = cell(shell, "inc(1)", capsys)
    assert result.result == 2 and out == "" and err == ""


def test_newer_version_replaces_an_earlier_cluster_version(
    shell: InteractiveShell, member: clustorage.Node, peer: clustorage.Node
) -> None:
    """A redefinition elsewhere rebinds a name that holds an earlier cluster version."""
    peer.define("v", "lambda: 1")
    assert shell.run_cell("v()").result == 1
    shell.run_cell("alias = v")
    peer.define("v", "lambda: 2")
    assert shell.run_cell("v()").result == 2
    assert shell.run_cell("alias()").result == 1  # other names are the user's business


def test_user_object_is_never_clobbered_and_the_notice_is_shown_once(
    shell: InteractiveShell,
    member: clustorage.Node,
    peer: clustorage.Node,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A user's own object keeps its name; one notice points at clustorage.functions.NAME."""
    shell.run_cell("total = 'mine'")
    peer.define("total", "def total(xs):\n    return sum(xs)\n")
    result, out, _ = cell(shell, "total", capsys)
    assert result.result == "mine"
    assert out.startswith(
        "clustorage: 'total' is taken in your namespace; "
        "the cluster's version is clustorage.functions.total\n"
    )
    peer.define("total", "def total(xs):\n    return sum(xs) + 0\n")
    result, out, _ = cell(shell, "clustorage.functions.total([1, 2])", capsys)
    assert result.result == 3 and "taken" not in out
    assert shell.user_ns["total"] == "mine"
    shell.run_cell("del total")
    peer.define("total", "def total(xs):\n    return -sum(xs)\n")
    assert shell.run_cell("total([1, 2])").result == -3


def test_own_definition_does_not_clobber_either(
    shell: InteractiveShell, member: clustorage.Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """%%cluster_call over a name the user holds: defined and called, the name is kept."""
    shell.run_cell("mine = 7")
    result, out, _ = cell(shell, "%%cluster_call mine 2\ndef mine(x):\n    return x\n", capsys)
    assert result.result == 2 and "'mine' is taken" in out
    assert shell.user_ns["mine"] == 7


def test_cluster_stop_keeps_bound_functions(
    shell: InteractiveShell, member: clustorage.Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """%cluster_stop stops the node; functions already bound stay callable."""
    shell.run_cell("%%cluster_call keep\ndef keep():\n    return 'kept'\n")
    _, out, _ = cell(shell, "%cluster_stop", capsys)
    assert out == "stopped node nb\n" and clustorage.default_node() is None
    assert shell.run_cell("keep()").result == "kept"
    _, out, _ = cell(shell, "%cluster_stop", capsys)
    assert out == "no clustorage node runs here\n"


def test_unreachable_loader_is_one_line(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    """A miss while the loader is down: LoaderUnavailable as one line naming the loader."""
    from conftest import free_port

    port = free_port()
    shell.run_line_magic("cluster_start", f"--name nb --loader gone@127.0.0.1:{port} --timeout 0.5")
    result, out, _ = cell(shell, "%cluster_get k 1", capsys)
    assert isinstance(result.error_in_exec, clustorage.LoaderUnavailable)
    assert out.count("\n") == 1 and f"gone@127.0.0.1:{port}" in out


# -- status -------------------------------------------------------------------------------


def test_cluster_status_text_and_html(
    shell: InteractiveShell, member: clustorage.Node, peer: clustorage.Node
) -> None:
    """%cluster_status: loader, nodes with role and address, counts; text and HTML."""
    shell.run_line_magic("cluster_get", "k 1")
    status = shell.run_line_magic("cluster_status", "")
    assert isinstance(status, ClusterStatus)
    text = repr(status)
    assert text.splitlines()[0].startswith(f"nb is a member of {member.loader_address} (connected)")
    assert "1 key, 0 functions" in text
    for name in ("hub", "nb (this node)", "peer"):
        assert name in text
    page = status._repr_html_()
    assert page.startswith("<table") and "<td>peer</td>" in page and "<td>member</td>" in page


def test_status_durations() -> None:
    """ "connected for" reads like a clock: seconds, minutes, hours, days."""
    nodes = [
        {"name": n, "role": "member", "address": "a", "connected_since": 1000.0 - s}
        for n, s in (("a", 5), ("b", 125), ("c", 7260), ("d", 90000))
    ]
    status = ClusterStatus({"name": "a", "nodes": nodes}, now=1000.0)
    assert [row[3] for row in status.rows()] == ["5s", "2m 05s", "2h 01m", "1d 01h"]


# -- the namespace sync on its own --------------------------------------------------------


def test_namespace_sync_follows_a_node(hub: clustorage.Node, peer: clustorage.Node) -> None:
    """NamespaceSync queues from any thread and binds only when apply() is called."""
    namespace: dict[str, Any] = {"taken": 1}
    notices: list[str] = []
    woken: list[bool] = []
    sync = NamespaceSync(namespace, notice=notices.append, wakeup=lambda: woken.append(True))
    hub.define("early", "lambda: 'early'")
    sync.attach(hub)
    assert sync.pending == ["early"] and namespace == {"taken": 1}
    peer.define("taken", "lambda: 'cluster'")
    assert woken and set(sync.pending) == {"early", "taken"}
    assert sync.apply() == ["early"]
    assert namespace["early"]() == "early" and namespace["taken"] == 1
    assert len(notices) == 1 and is_cluster_function(namespace["early"], "early")
    peer.delete("early", kind="function")
    assert sync.apply() == ["early"] and "early" not in namespace
    sync.detach()
    peer.define("late", "lambda: 0")
    assert sync.apply() == [] and "late" not in namespace


def test_session_is_reachable_for_other_front_ends(shell: InteractiveShell) -> None:
    """session_for(shell) gives the sync a terminal front-end can apply before a prompt."""
    session = session_for(shell)
    assert session is not None and session.sync.namespace is shell.user_ns


def test_unload_removes_magics_and_hooks(shell: InteractiveShell) -> None:
    """%unload_ext clustorage removes the magics, the hook and the error display."""
    unload_ipython_extension(shell)
    assert not LINE_MAGICS & set(shell.magics_manager.magics["line"])
    assert shell.custom_exceptions == ()
    assert session_for(shell) is None
