"""The %cluster_* magics on a real IPython shell, against a real (in-process) loader."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from html.parser import HTMLParser
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


def test_load_ext_in_a_cell_with_the_loader_down_says_so_in_that_cell(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """%load_ext clustorage with $CLUSTORAGE_LOADER naming a loader that is not up: that very
    cell says so (a kernel starting with the extension says it in its first cell)."""
    from tests.conftest import free_port

    address = f"later@127.0.0.1:{free_port()}"
    monkeypatch.setenv("CLUSTORAGE_LOADER", address)
    monkeypatch.setenv("CLUSTORAGE_NAME", "early")
    monkeypatch.setenv("CLUSTORAGE_COOKIE", COOKIE)
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    ip = InteractiveShell(config=config, ipython_dir=str(tmp_path / "ipython"))
    try:
        _, out, _ = cell(ip, "%load_ext clustorage", capsys)
        assert out.startswith(f"the loader {address} is not reachable yet (")
        assert cell(ip, "x = 1", capsys)[1] == ""
    finally:
        unload_ipython_extension(ip)
        clustorage.stop()


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


def test_cluster_start_again_with_the_same_flags_changes_nothing(
    shell: InteractiveShell, member: clustorage.Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same %cluster_start again (as "Run All" does) says the node runs, in one line;
    so do a loader's own flags (--listen, --data), which a member has no use for."""
    said = f"node nb is already running (member of {member.loader_address}, connected)\n"
    _, out, err = cell(shell, f"%cluster_start --name nb --loader {member.loader_address}", capsys)
    assert out == said and err == "" and clustorage.default_node() is member
    again = f"%cluster_start --name nb --loader {member.loader_address} --data elsewhere"
    _, out, err = cell(shell, again + " --listen 127.0.0.1:1", capsys)
    assert out == said and err == "" and clustorage.default_node() is member


def test_cluster_start_with_other_flags_says_how_to_switch(
    shell: InteractiveShell, member: clustorage.Node
) -> None:
    """A %cluster_start for another node names the flags that differ and %cluster_stop."""
    with pytest.raises(UsageError, match=r"and --name, --loader differ from it.*%cluster_stop"):
        shell.run_line_magic("cluster_start", "--name other")
    loader = member.loader_address
    with pytest.raises(UsageError, match=r"and --timeout differs from it"):
        shell.run_line_magic("cluster_start", f"--name nb --loader {loader} --timeout 9")
    assert clustorage.default_node() is member


def test_bare_cluster_start_asks_for_a_name_and_creates_nothing(
    shell: InteractiveShell, home: Path
) -> None:
    """A loader without --name would get a new store each time: refused, no file made."""
    with pytest.raises(UsageError, match="--name NAME"):
        shell.run_line_magic("cluster_start", "")
    assert clustorage.default_node() is None
    assert not list(home.rglob("*.sqlite3"))


def test_failed_listen_leaves_no_store_file(shell: InteractiveShell, home: Path) -> None:
    """A loader that cannot listen ("Address already in use") leaves no store behind."""
    with clustorage.Node("first", listen="127.0.0.1:0", data=str(home / "first")) as first:
        busy = f"{first.address[0]}:{first.address[1]}"
        with pytest.raises(clustorage.ConfigError, match="cannot listen"):
            shell.run_line_magic("cluster_start", f"--name second --listen {busy}")
    assert clustorage.default_node() is None
    assert [p.name for p in home.rglob("*.sqlite3*") if "second" in p.name] == []


def test_reload_ext_keeps_the_node_it_started(
    shell: InteractiveShell, member: clustorage.Node
) -> None:
    """%reload_ext clustorage runs the package's module again: the node started before is
    still the one the magics use, and its name is not taken by an orphan."""
    shell.run_line_magic("reload_ext", "clustorage")
    assert clustorage.default_node() is member
    assert shell.run_line_magic("cluster_get", "after_reload 5") == 5
    shell.run_line_magic("cluster_stop", "")
    again = shell.run_line_magic("cluster_start", f"--name nb --loader {member.loader_address}")
    assert again is not member and again.connected


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


def test_cluster_get_takes_a_quoted_key_without_its_quotes(
    shell: InteractiveShell, member: clustorage.Node
) -> None:
    """A KEY written as Python would ('k', "a key") is that key, not one with quotes in it;
    a quote left open is a usage error saying so."""
    assert shell.run_line_magic("cluster_get", "'quoted' 5") == 5
    assert shell.run_line_magic("cluster_get", "quoted") == 5
    assert shell.run_line_magic("cluster_get", '"two words" 1 + 1') == 2
    assert member.get("two words") == 2
    assert member.keys() == ["quoted", "two words"]
    with pytest.raises(UsageError, match="opens a quote it does not close"):
        shell.run_line_magic("cluster_get", "'open 1")


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


def test_cluster_get_without_a_key_says_key_is_required(
    shell: InteractiveShell, member: clustorage.Node
) -> None:
    """A bare %cluster_get names KEY as required and EXPR as optional."""
    with pytest.raises(UsageError, match=r"needs a KEY.*optional EXPR"):
        shell.run_line_magic("cluster_get", "")


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


def test_delete_of_a_value_named_like_a_function_points_at_function(
    shell: InteractiveShell, member: clustorage.Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """%cluster_delete NAME where only a function has that name says how to delete it."""
    member.define("twice", "lambda x: 2 * x")
    _, out, _ = cell(shell, "%cluster_delete twice", capsys)
    assert out == (
        "no value 'twice' to delete; a function has that name: %cluster_delete --function twice\n"
    )


@pytest.mark.parametrize(
    ("magic", "line", "usage"),
    [("cluster_get", "--nme answer", "KEY [EXPR]"), ("cluster_call", "--nmae f 1", "NAME")],
)
def test_a_mistyped_option_is_named(
    shell: InteractiveShell, member: clustorage.Node, magic: str, line: str, usage: str
) -> None:
    """A mistyped option is named as such, not reported as missing arguments."""
    option = line.split()[0]
    expected = re.escape(f"%{magic} has no option {option}: use %{magic} {usage}")
    with pytest.raises(UsageError, match=expected):
        shell.run_line_magic(magic, line)


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


def plain(text: str) -> str:
    """``text`` without terminal colours."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_compile_error_shows_the_cell_line_and_loads_nothing(
    shell: InteractiveShell,
    member: clustorage.Node,
    peer: clustorage.Node,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Bad cell source: the line as numbered in the cell, a caret; nothing loaded."""
    result, out, _ = cell(shell, "%%cluster_call broken\ndef broken(:\n    pass\n", capsys)
    assert isinstance(result.error_in_exec, clustorage.CompileError)
    lines = plain(out).strip().splitlines()
    assert lines[0].endswith(":2") or lines[0].endswith(", line 2"), lines
    assert lines[1:] == ["    def broken(:", "               ^", "CompileError: invalid syntax"]
    assert "broken" not in member.functions() and "broken" not in peer.functions()
    assert "broken" not in shell.user_ns


def test_compile_error_line_counts_blank_and_indented_cells(
    shell: InteractiveShell, member: clustorage.Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """Leading blank lines and a common indent do not shift the line or the caret."""
    code = "%%cluster_call broken\n\n  def broken(a):\n      return (a +\n"
    _, out, _ = cell(shell, code, capsys)
    lines = plain(out).strip().splitlines()
    assert lines[0].endswith(":4") or lines[0].endswith(", line 4"), lines
    assert lines[1:] == [
        "    return (a +",
        "           ^",
        "CompileError: '(' was never closed",
    ]


def test_tb_shows_the_last_compile_error(
    shell: InteractiveShell, member: clustorage.Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """%tb after a CompileError shows that error again, not "No traceback available"."""
    _, first, _ = cell(shell, "%%cluster_call broken\ndef broken(:\n    pass\n", capsys)
    _, again, err = cell(shell, "%tb", capsys)
    assert "No traceback" not in err and plain(again) == plain(first)


def test_tb_shows_the_full_traceback_of_a_one_line_error(
    shell: InteractiveShell, member: clustorage.Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """A clustorage error is one line in its cell; %tb then shows where it came from."""
    _, out, _ = cell(shell, "%cluster_get nothing.here", capsys)
    assert out.count("\n") == 1
    _, tb, _ = cell(shell, "%tb", capsys)
    assert "Traceback" in plain(tb) and "NotFound" in plain(tb)


@pytest.mark.parametrize("name", ["def", "None", "True"])
def test_keyword_function_names_are_refused(
    shell: InteractiveShell, member: clustorage.Node, name: str
) -> None:
    """A function named like a Python keyword: a clear error, nothing sent anywhere."""
    with pytest.raises(UsageError, match="keyword"):
        shell.run_cell_magic("cluster_call", name, "lambda: 1\n")
    with pytest.raises(ValueError, match="keyword"):
        member.define(name, "lambda: 1")
    assert member.functions() == []


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


def arrived(node: clustorage.Node, deleted: str) -> None:
    """Wait until the deletion of function ``deleted`` reached ``node`` (it is pushed)."""
    deadline = time.monotonic() + 10
    while deleted in node.functions() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert deleted not in node.functions()


def test_builtin_shadowing_is_said_once_and_delete_restores_the_builtin(
    shell: InteractiveShell,
    member: clustorage.Node,
    peer: clustorage.Node,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A cluster sum shadows the built-in: said once, in the next cell; deleting restores it."""
    peer.define("sum", "def sum(a, b):\n    return a + b\n")
    result, out, _ = cell(shell, "sum(2, 3)", capsys)
    assert result.result == 5
    assert out == (
        "clustorage: sum v1 from peer now shadows the built-in sum; builtins.sum is the original\n"
    )
    result, out, _ = cell(shell, "import builtins; builtins.sum([1, 2])", capsys)
    assert result.result == 3 and out == ""
    peer.delete("sum", kind="function")
    arrived(member, "sum")
    result, out, _ = cell(shell, "sum([1, 2, 3])", capsys)
    assert result.result == 6
    assert out == "clustorage: sum was deleted by peer; the built-in sum is visible again\n"


def test_own_shadowing_definition_is_said_after_its_load_line(
    shell: InteractiveShell, member: clustorage.Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """%%cluster_call print: loaded, then the shadowing notice; %cluster_delete undoes it."""
    _, out, _ = cell(shell, "%%cluster_call len\nlambda xs: -1\n", capsys)
    assert out.splitlines()[0].startswith("len v1 loaded on ")
    assert out.splitlines()[1] == (
        "clustorage: len v1 from nb now shadows the built-in len; builtins.len is the original"
    )
    assert shell.run_cell("len([1])").result == -1
    _, out, _ = cell(shell, "%cluster_delete --function len", capsys)
    assert out == (
        "deleted function 'len'\n"
        "clustorage: len was deleted by nb; the built-in len is visible again\n"
    )
    assert shell.run_cell("len([1])").result == 1


def test_rebinding_from_elsewhere_is_announced_once_in_the_next_cell(
    shell: InteractiveShell,
    member: clustorage.Node,
    peer: clustorage.Node,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A new version from another node: one line in the next cell, none in the ones after."""
    peer.define("scale", "lambda x: x")
    result, out, _ = cell(shell, "scale(2)", capsys)
    assert result.result == 2 and out == ""  # a new name: bound silently
    peer.define("scale", "lambda x: 10 * x")
    assert capsys.readouterr() == ("", "")  # nothing from the background thread
    result, out, _ = cell(shell, "scale(2)", capsys)
    assert result.result == 20 and out == "clustorage: scale rebound to v2 from peer\n"
    result, out, _ = cell(shell, "scale(3)", capsys)
    assert result.result == 30 and out == ""
    peer.delete("scale", kind="function")
    arrived(member, "scale")
    result, out, _ = cell(shell, "'scale' in dir()", capsys)
    assert result.result is False and out == "clustorage: scale was deleted by peer\n"


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


def test_after_cluster_stop_get_and_call_say_how_to_start_a_node(
    shell: InteractiveShell, hub: clustorage.Node
) -> None:
    """Where the session binds get, call and node (the clustorage kernel, the shell), a stop
    unbinds them from the stopped node: get and call say how to start one, node is None; a
    new start binds them again."""
    session_for(shell).bind_api = True
    shell.run_line_magic("cluster_start", f"--name nb --loader {hub.loader_address}")
    assert shell.run_cell("get('k', lambda: 1)").result == 1
    shell.run_line_magic("cluster_stop", "")
    assert shell.user_ns["node"] is None
    with pytest.raises(UsageError, match="%cluster_start"):
        shell.user_ns["get"]("k2", lambda: 2)
    with pytest.raises(UsageError, match="%cluster_start"):
        shell.user_ns["call"]("f", [])
    node = shell.run_line_magic("cluster_start", f"--name nb2 --loader {hub.loader_address}")
    assert shell.user_ns["node"] is node
    assert shell.run_cell("get('k')").result == 1


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
    cells = html_cells(status._repr_html_())
    assert ("td", "left", "peer") in cells and ("td", "left", "member") in cells


class _Cells(HTMLParser):
    """The table cells of an HTML page, as (tag, text-align, text), and its paragraphs."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[tuple[str, str, str]] = []
        self.paragraphs: list[str] = []
        self._open: tuple[str, str] | None = None
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag in ("td", "th", "p"):
            style = dict(attrs).get("style") or ""
            align = re.search(r"text-align:\s*(\w+)", style)
            self._open = (tag, align.group(1) if align else "")

    def handle_data(self, data: str) -> None:
        if self._open is None:
            return
        tag, align = self._open
        if tag == "p":
            self.paragraphs.append(data)
        else:
            self.cells.append((tag, align, data))
        self._open = None


def html_cells(page: str) -> list[tuple[str, str, str]]:
    """(tag, text-align, text) of every table cell in ``page``."""
    parser = _Cells()
    parser.feed(page)
    return parser.cells


def test_status_html_aligns_names_left_and_numbers_right() -> None:
    """In notebooks: words left, durations right, the summary a paragraph, not a caption."""
    nodes = [
        {"name": "app1", "role": "loader", "address": "local", "connected_since": 995.0},
        {"name": "app2", "role": "member", "address": "10.0.0.2:5", "connected_since": 875.0},
    ]
    status = ClusterStatus({"name": "app2", "loader": "app1@h:1", "nodes": nodes}, now=1000.0)
    page = status._repr_html_()
    assert "<caption" not in page
    parser = _Cells()
    parser.feed(page)
    assert parser.paragraphs[0].startswith("app2 is a member of app1@h:1")
    assert parser.cells == [
        ("th", "left", "node"),
        ("th", "left", "role"),
        ("th", "left", "address"),
        ("th", "right", "connected for"),
        ("td", "left", "app1"),
        ("td", "left", "loader"),
        ("td", "left", "local"),
        ("td", "right", "5s"),
        ("td", "left", "app2 (this node)"),
        ("td", "left", "member"),
        ("td", "left", "10.0.0.2:5"),
        ("td", "right", "2m 05s"),
    ]


def test_status_with_the_loader_down_says_so_in_html_too(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    """The loader does not answer: text and HTML both say so, not an empty table."""
    from conftest import free_port

    port = free_port()
    shell.run_line_magic("cluster_start", f"--name nb --loader gone@127.0.0.1:{port} --timeout 0.5")
    status = shell.run_line_magic("cluster_status", "")
    assert "the loader does not answer" in repr(status)
    page = status._repr_html_()
    assert "<table" not in page and "the loader does not answer" in page
    assert "not connected" in page


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


def test_cluster_start_over_tls(shell: InteractiveShell, tmp_path: Path) -> None:
    """%cluster_start --tls-cert/--tls-key/--tls-ca joins a TLS loader."""
    pytest.importorskip("cryptography")
    folder = tmp_path / "tls"
    clustorage.init_tls(folder, ["hub", "nb"], [])

    def files(name: str) -> dict[str, Path]:
        return {
            "tls_cert": folder / f"{name}.pem",
            "tls_key": folder / f"{name}-key.pem",
            "tls_ca": folder / "ca.pem",
        }

    with clustorage.Node(
        "hub", cookie=COOKIE, listen="127.0.0.1:0", data=":memory:", **files("hub")
    ) as hub:
        hub.put("greeting", "hello")
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in files("nb").items())
        node = shell.run_line_magic(
            "cluster_start", f"--name nb --loader {hub.loader_address} {flags}"
        )
        assert isinstance(node, clustorage.Node) and node.config.tls_cert
        assert node.get("greeting") == "hello"
        clustorage.stop()


def test_a_front_end_leaves_out_only_its_own_nodes_link_records() -> None:
    """The shell says its node's lost loader itself; another node of the process (one the
    user made, say) still has its record shown."""
    import logging

    from clustorage.magics.loader_link import LINK_LOGGER, LOST, UNREACHABLE, LeaveOut

    def record(kind: str | None, node: str) -> logging.LogRecord:
        made = logging.LogRecord(LINK_LOGGER, logging.WARNING, __file__, 1, "lost", (), None)
        if kind is not None:
            made.loader_link, made.node = kind, node
        return made

    followed = LeaveOut(LOST, node="app2")
    assert not followed.filter(record(LOST, "app2"))
    assert followed.filter(record(LOST, "w"))
    assert followed.filter(record(UNREACHABLE, "app2"))
    assert followed.filter(record(None, "app2"))
    following_none = LeaveOut(LOST, node="")
    assert following_none.filter(record(LOST, "app2"))
    every_node = LeaveOut(UNREACHABLE)
    assert not every_node.filter(record(UNREACHABLE, "w"))
