"""The clustorage kernel: kernelspec install, and real kernels joined to a real loader."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jupyter_kernel_test as jkt
import pytest
from conftest import COOKIE, ROOT, Cluster, free_port
from conftest_jupyter import Kernel, install_kernelspec, isolated_env

import clustorage
from clustorage import kernel as kernelspec

pytestmark = pytest.mark.timeout(60)


def plain(text: str) -> str:
    """``text`` without terminal colours."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


# -- the kernelspec, as data and as files -------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_kernel_dict_is_pure_data() -> None:
    """get_kernel_dict: this Python runs clustorage.kernel; env only when asked for."""
    spec = kernelspec.get_kernel_dict(executable="/opt/py/bin/python")
    assert spec["argv"][0] == "/opt/py/bin/python"
    assert spec["argv"][-4:] == ["-m", "clustorage.kernel", "-f", "{connection_file}"]
    assert spec["display_name"] == "Clustorage (Python 3)" and spec["language"] == "python"
    assert "env" not in spec
    spec = kernelspec.get_kernel_dict(node_name="app2", loader="app1@10.0.0.1:4370")
    assert spec["env"] == {"CLUSTORAGE_NAME": "app2", "CLUSTORAGE_LOADER": "app1@10.0.0.1:4370"}


def test_kernel_dict_rejects_bad_names() -> None:
    """Node and loader names follow the cluster's naming rule."""
    with pytest.raises(ValueError, match="node name"):
        kernelspec.get_kernel_dict(node_name="no spaces")
    with pytest.raises(ValueError, match="loader name"):
        kernelspec.get_kernel_dict(loader="bad!@127.0.0.1")


def test_repo_kernelspec_matches_the_packaged_one() -> None:
    """kernel/ at the repository top holds the same kernel.json and logos as the package."""
    for name in ("kernel.json", "logo-32x32.png", "logo-64x64.png"):
        assert (ROOT / "kernel" / name).read_bytes() == (kernelspec.RESOURCES / name).read_bytes()
    for size in (32, 64):
        data = (kernelspec.RESOURCES / f"logo-{size}x{size}.png").read_bytes()
        assert png_size(data) == (size, size)
    spec = json.loads((ROOT / "kernel" / "kernel.json").read_text())
    assert spec["display_name"] == "Clustorage (Python 3)"


def test_install_into_a_prefix_never_writes_the_cookie(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """clustorage-kernel install --prefix: kernel.json with env and logos, and no cookie."""
    monkeypatch.setenv("CLUSTORAGE_COOKIE", "sentinel-secret")
    status = kernelspec.main(
        ["install", "--prefix", str(tmp_path), "--node-name", "app2", "--loader", "app1"]
    )
    target = tmp_path / "share" / "jupyter" / "kernels" / "clustorage"
    assert status == 0
    assert capsys.readouterr().out == f"Installed kernelspec clustorage in {target}\n"
    assert sorted(p.name for p in target.iterdir()) == [
        "kernel.json",
        "logo-32x32.png",
        "logo-64x64.png",
    ]
    text = (target / "kernel.json").read_text()
    assert "sentinel-secret" not in text and "COOKIE" not in text
    assert json.loads(text)["env"] == {"CLUSTORAGE_NAME": "app2", "CLUSTORAGE_LOADER": "app1"}


def test_install_with_tls_writes_paths_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--tls-cert/--tls-key/--tls-ca write absolute paths into env, never what the files hold;
    some but not all of them is a usage error."""
    key = tmp_path / "k-key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nsentinel-key\n")
    flags = ["--tls-cert", str(tmp_path / "k.pem"), "--tls-key", str(key)]
    flags += ["--tls-ca", str(tmp_path / "ca.pem")]
    assert kernelspec.main(["install", "--prefix", str(tmp_path), *flags]) == 0
    text = (tmp_path / "share/jupyter/kernels/clustorage/kernel.json").read_text()
    assert "sentinel-key" not in text
    assert json.loads(text)["env"] == {
        "CLUSTORAGE_TLS_CERT": str(tmp_path / "k.pem"),
        "CLUSTORAGE_TLS_KEY": str(key),
        "CLUSTORAGE_TLS_CA": str(tmp_path / "ca.pem"),
    }
    assert kernelspec.main(["install", "--prefix", str(tmp_path), *flags[:2]]) == 2
    assert "missing --tls-key, --tls-ca" in capsys.readouterr().err


def test_install_with_another_name(tmp_path: Path) -> None:
    """--name K installs under K with a display name that tells it apart."""
    assert kernelspec.main(["install", "--prefix", str(tmp_path), "--name", "cs-app3"]) == 0
    spec = json.loads((tmp_path / "share/jupyter/kernels/cs-app3/kernel.json").read_text())
    assert spec["display_name"] == "Clustorage (Python 3) [cs-app3]"


def test_install_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--user with --prefix, or an invalid name, is refused with exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        kernelspec.main(["install", "--user", "--prefix", str(tmp_path)])
    assert exit_info.value.code == 2
    assert kernelspec.main(["install", "--prefix", str(tmp_path), "--node-name", "a b"]) == 2
    assert "invalid node name" in capsys.readouterr().err


# -- real kernels, one real loader --------------------------------------------------------


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The clustorage kernelspec installed into a temporary prefix."""
    return install_kernelspec(tmp_path_factory.mktemp("prefix"))


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real ``clustorage loader`` process named hub."""
    cluster = Cluster(tmp_path_factory.mktemp("hub"))
    try:
        cluster.start_loader("hub")
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def kernels(
    hub: Cluster, jupyter_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Kernel, Kernel]]:
    """Kernels ka and kb, members of hub through their kernelspec's environment."""
    tmp = tmp_path_factory.mktemp("kernels")
    started: list[Kernel] = []
    try:
        for name in ("ka", "kb"):
            env = isolated_env(
                tmp / name,
                jupyter_path,
                CLUSTORAGE_LOADER=hub.loader,
                CLUSTORAGE_NAME=name,
                CLUSTORAGE_COOKIE=COOKIE,
            )
            started.append(Kernel(jupyter_path, env, tmp / f"{name}.json"))
        for kernel in started:
            kernel.wait_ready()
        yield started[0], started[1]
    finally:
        for kernel in started:
            kernel.close()


def test_plain_kernel_until_cluster_start(hub: Cluster, jupyter_path: Path, tmp_path: Path) -> None:
    """Without CLUSTORAGE_* the kernel is plain Python; %cluster_start joins later."""
    kernel = Kernel(jupyter_path, isolated_env(tmp_path, jupyter_path), tmp_path / "k.json")
    try:
        kernel.wait_ready()
        assert kernel.ok("clustorage.default_node() is None").text == "True"
        run = kernel.run("%cluster_keys")
        assert run.status == "error" and "%cluster_start" in run.stderr
        run = kernel.ok(f"%cluster_start --name plain --loader {hub.loader} --cookie {COOKIE}")
        assert run.text.startswith("<clustorage.Node plain (member of hub@")
    finally:
        kernel.close()


def test_cluster_start_again_is_one_line_unless_it_asks_for_another_node(
    hub: Cluster, kernels: tuple[Kernel, Kernel]
) -> None:
    """%cluster_start for the node that runs (its flags, or the environment that started it)
    says so in one line and succeeds, so "Run All" goes on; other flags are an error naming
    them and %cluster_stop."""
    ka, _ = kernels
    said = f"node ka is already running (member of {hub.loader}, connected)\n"
    for line in (f"%cluster_start --name ka --loader {hub.loader}", "%cluster_start"):
        run = ka.ok(line)
        assert (run.stdout, run.stderr, run.text) == (said, "", "")
    run = ka.run(f"%cluster_start --name kz --loader {hub.loader}")
    assert run.status == "error" and run.stdout == ""
    assert run.stderr == (
        f"UsageError: this process already runs node 'ka' (member of {hub.loader}), and "
        "--name differs from it; to switch, run %cluster_stop first, then %cluster_start again\n"
    )
    assert ka.ok("clustorage.default_node().name").text == "'ka'"


def test_a_kernel_whose_loader_is_down_at_start_says_so_in_its_first_cell(
    jupyter_path: Path, tmp_path: Path
) -> None:
    """A kernelspec's member whose loader is not up: the first cell's output says so, with
    the reason and how to start the loader; its stderr has no library warning."""
    port = free_port()
    address = f"later@127.0.0.1:{port}"
    env = isolated_env(
        tmp_path,
        jupyter_path,
        CLUSTORAGE_LOADER=address,
        CLUSTORAGE_NAME="early",
        CLUSTORAGE_COOKIE=COOKIE,
    )
    kernel = Kernel(jupyter_path, env, tmp_path / "k.json")
    try:
        kernel.wait_ready()
        run = kernel.ok("1 + 1")
        assert run.stderr == ""
        lines = run.stdout.splitlines()
        assert lines[0].startswith(f"the loader {address} is not reachable yet ([Errno 111]")
        assert lines[1].startswith("to start that loader: clustorage loader --name later")
        assert run.text == "2"
        assert kernel.ok("2 + 2").stdout == ""  # said once
    finally:
        kernel.close()


def test_cluster_start_with_the_loader_down_says_so_and_keeps_trying(
    jupyter_path: Path, tmp_path: Path
) -> None:
    """The loader is not up yet: the cell succeeds and says, in its output, that the node
    keeps trying and how to start that loader; once started, the node joins it."""
    (tmp_path / "later").mkdir()
    later = Cluster(tmp_path / "later")
    port = free_port()
    kernel = Kernel(jupyter_path, isolated_env(tmp_path, jupyter_path), tmp_path / "k.json")
    try:
        kernel.wait_ready()
        address = f"later@127.0.0.1:{port}"
        run = kernel.ok(f"%cluster_start --name early --loader {address} --cookie {COOKIE}")
        assert run.stderr == ""
        assert run.stdout.splitlines() == [
            f"the loader {address} is not reachable yet ([Errno 111] Connection refused): "
            "early keeps trying, and joins it as "
            "soon as it answers (until then, a value or function early lacks raises "
            "LoaderUnavailable after 5 s)",
            f"to start that loader: clustorage loader --name later --listen 127.0.0.1:{port} "
            "(with the cookie of --cookie)",
        ]
        assert run.text == f"<clustorage.Node early (member of {address}, disconnected)>"
        later.start_loader("later", port=port)
        joined = "clustorage.default_node().connected"
        deadline = time.monotonic() + 20  # the node retries with a backoff capped at seconds
        while kernel.ok(joined).text != "True" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert kernel.ok(joined).text == "True"
        assert kernel.ok("%cluster_get joined 'yes'").text == "'yes'"
    finally:
        kernel.close()
        later.close()


def test_status_shows_every_node(kernels: tuple[Kernel, Kernel]) -> None:
    """%cluster_status: an HTML table naming the loader and both kernels."""
    ka, _ = kernels
    run = ka.ok("%cluster_status")
    page = run.data["text/html"]
    assert "<table" in page
    for name in ("hub", "ka (this node)", "kb", "loader"):
        assert f">{name}</td>" in page
    assert run.text.startswith("ka is a member of hub@127.0.0.1:")


def test_value_magics(kernels: tuple[Kernel, Kernel]) -> None:
    """%cluster_get/%%cluster_get compute once for both kernels; keys and delete work."""
    ka, kb = kernels
    assert ka.ok("%cluster_get kt.answer 6 * 7").text == "42"
    assert (
        kb.ok("%%cluster_get kt.answer\nraise AssertionError('a hit runs nothing')\n0").text == "42"
    )
    assert kb.ok("%%cluster_get kt.cell\nx = 20\nx + 1").text == "21"
    assert ka.ok("%cluster_keys").text == "['kt.answer', 'kt.cell']"
    assert kb.ok("%cluster_delete kt.cell").stdout == "deleted value 'kt.cell'\n"
    assert kb.ok("%cluster_keys").text == "['kt.answer']"
    deadline = time.monotonic() + 10  # a deletion reaches other nodes asynchronously
    while ka.ok("%cluster_keys").text != "['kt.answer']" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ka.ok("%cluster_keys").text == "['kt.answer']"
    assert ka.ok("'kt' in dir()").text == "False"  # values are not bound


def test_function_from_kernel_a_is_a_bare_name_in_kernel_b(
    kernels: tuple[Kernel, Kernel],
) -> None:
    """%%cluster_call in ka: kb calls the function by its bare name on its next cell."""
    ka, kb = kernels
    run = ka.ok("%%cluster_call kt_double\ndef kt_double(x):\n    return 2 * x\n")
    assert run.stdout.startswith("kt_double v1 loaded on ") and "kb" in run.stdout
    assert kb.ok("kt_double(21)").text == "42"
    assert kb.ok("%cluster_call kt_double 4").text == "8"
    assert "kt_double" in kb.ok("%cluster_functions").text
    source = kb.ok("%cluster_source kt_double").data
    assert "return 2 * x" in source["text/plain"] and "```python" in source["text/markdown"]


def test_redefinition_in_b_reaches_a(kernels: tuple[Kernel, Kernel]) -> None:
    """A new version defined in kb replaces the one ka has bound."""
    ka, kb = kernels
    ka.ok("%%cluster_call kt_inc\ndef kt_inc(x):\n    return x + 1\n")
    assert ka.ok("kt_inc(1)").text == "2"
    run = kb.ok("%%cluster_call kt_inc\ndef kt_inc(x):\n    return x + 100\n")
    assert run.stdout.startswith("kt_inc v2 loaded on ")
    run = ka.ok("kt_inc(1)")
    assert run.text == "101" and run.stdout == "clustorage: kt_inc rebound to v2 from kb\n"
    assert ka.ok("kt_inc(2)").stdout == ""  # said once
    run = kb.ok("%%cluster_call kt_inc\ndef kt_inc(x):\n    return x + 100\n")
    assert run.stdout == "kt_inc v2 unchanged (same source)\n"


def test_builtin_shadowing_is_said_in_each_kernel_and_undone_by_delete(
    kernels: tuple[Kernel, Kernel],
) -> None:
    """A cluster ascii shadows the builtin: each kernel says so once; deleting restores it."""
    ka, kb = kernels
    notice = "now shadows the built-in ascii; builtins.ascii is the original"
    run = kb.ok("%%cluster_call ascii\nlambda x: 'cluster'\n")
    assert run.stdout.splitlines()[1] == f"clustorage: ascii v1 from kb {notice}"
    run = ka.ok("ascii(1)")
    assert run.text == "'cluster'" and run.stdout == f"clustorage: ascii v1 from kb {notice}\n"
    assert ka.ok("ascii(2)").stdout == ""
    assert kb.ok("%cluster_delete --function ascii").stdout == (
        "deleted function 'ascii'\n"
        "clustorage: ascii was deleted by kb; the built-in ascii is visible again\n"
    )
    deadline = time.monotonic() + 10  # a deletion reaches other nodes asynchronously
    while (run := ka.ok("ascii(1)")).text != "'1'" and time.monotonic() < deadline:
        assert run.stdout == ""
        time.sleep(0.05)
    assert run.text == "'1'"
    assert (
        run.stdout == "clustorage: ascii was deleted by kb; the built-in ascii is visible again\n"
    )


def test_user_variable_is_not_clobbered(kernels: tuple[Kernel, Kernel]) -> None:
    """ka's own kt_mine survives kb's definition; ka is told once where the function is."""
    ka, kb = kernels
    ka.ok("kt_mine = 'mine'")
    kb.ok("%%cluster_call kt_mine\ndef kt_mine(x):\n    return x * 3\n")
    run = ka.ok("kt_mine")
    assert run.text == "'mine'"
    assert run.stdout == (
        "clustorage: 'kt_mine' is taken in your namespace; "
        "the cluster's version is clustorage.functions.kt_mine\n"
    )
    run = ka.ok("clustorage.functions.kt_mine(3)")
    assert run.text == "9" and run.stdout == ""


def test_bad_source_is_one_clear_error_and_loads_nothing(
    kernels: tuple[Kernel, Kernel],
) -> None:
    """A syntax error in a %%cluster_call cell: its line and a caret, nothing loaded anywhere."""
    ka, kb = kernels
    run = kb.run("%%cluster_call kt_bad\ndef kt_bad(:\n    pass\n")
    assert run.status == "error" and run.error is not None
    assert run.error["ename"] == "CompileError"
    assert plain("".join(run.error["traceback"])).splitlines() == [
        f"  Cell In[{run.execution_count}], line 2",
        "    def kt_bad(:",
        "               ^",
        "CompileError: invalid syntax",
    ]
    where = f"<cluster:kt_bad> in Cell In[{run.execution_count}]"
    assert run.error["evalue"] == f"invalid syntax ({where}, line 2, column 12)"
    assert run.stdout == ""
    for kernel in (ka, kb):
        assert "kt_bad" not in kernel.ok("%cluster_functions").text
        assert kernel.ok("'kt_bad' in dir()").text == "False"


def test_get_call_and_node_are_in_the_namespace(kernels: tuple[Kernel, Kernel]) -> None:
    """In a clustorage kernel, get, call and node are the running node's, as in the shell."""
    ka, _ = kernels
    assert ka.ok("node.name, get.__wrapped__.__self__ is node, call.__self__ is node").text == (
        "('ka', True, True)"
    )
    assert ka.ok("get('kt.ns', lambda: 'computed')").text == "'computed'"


def complete(kernel: Kernel, code: str) -> list[str]:
    """The matches a kernel's complete_request offers at the end of ``code``."""
    msg_id = kernel.kc.complete(code, len(code))
    reply = kernel.kc.get_shell_msg(timeout=30)
    assert reply["parent_header"]["msg_id"] == msg_id
    content = reply["content"]
    assert content["status"] == "ok"
    # Each match replaces code[cursor_start:cursor_end]: give back the whole text.
    head = code[: content["cursor_start"]]
    return sorted({head + match for match in content["matches"]})


def test_completion_of_keys_and_function_names(kernels: tuple[Kernel, Kernel]) -> None:
    """complete_request offers cluster keys and function names, in magics and in calls."""
    ka, kb = kernels
    ka.ok("%cluster_get kc.answer 42")
    ka.ok("%cluster_get kc.anchor 'a'")
    ka.ok("%%cluster_call kc_double\nlambda x: 2 * x\n")
    kb.ok("1")  # kb's replica has them before its next cell
    keys = ["kc.anchor", "kc.answer"]
    for code, prefix in [
        ("%cluster_get kc.an", "%cluster_get "),
        ("%%cluster_get kc.an", "%%cluster_get "),
        ("clustorage.get('kc.an", "clustorage.get('"),
        ("get('kc.an", "get('"),
        ('x = get("kc.an', 'x = get("'),
    ]:
        assert complete(kb, code) == [prefix + key for key in keys], code
    for code, prefix in [
        ("%cluster_call kc_d", "%cluster_call "),
        ("%cluster_source kc_d", "%cluster_source "),
        ("call('kc_d", "call('"),
        ("clustorage.call('kc_d", "clustorage.call('"),
    ]:
        assert complete(kb, code) == [prefix + "kc_double"], code
    assert "kc_double" in complete(kb, "kc_d")


def test_compile_error_names_the_cell_line_and_tb_shows_it(
    kernels: tuple[Kernel, Kernel],
) -> None:
    """A syntax error on line 3 of a %%cluster_call cell: Cell In[N], line 3, and a caret."""
    ka, _ = kernels
    run = ka.run("%%cluster_call kt_caret\ndef kt_caret(x):\n    return (x +\n")
    assert run.status == "error" and run.error is not None
    number = run.execution_count
    shown = plain("".join(run.error["traceback"]))
    assert shown.splitlines() == [
        f"  Cell In[{number}], line 3",
        "    return (x +",
        "           ^",
        "CompileError: '(' was never closed",
    ], shown
    assert run.error["evalue"] == (
        f"'(' was never closed (<cluster:kt_caret> in Cell In[{number}], line 3, column 12)"
    )
    again = ka.run("%tb")
    assert again.error is not None and plain("".join(again.error["traceback"])) == shown


def test_compile_error_from_a_magic_called_in_code_names_that_cell(
    kernels: tuple[Kernel, Kernel],
) -> None:
    """run_cell_magic('cluster_call', ...) in a cell: the error names that cell's In[N]."""
    ka, _ = kernels
    run = ka.run("get_ipython().run_cell_magic('cluster_call', 'kt_code', 'def kt_code(:\\n')")
    assert run.status == "error" and run.error is not None
    number = run.execution_count
    assert plain("".join(run.error["traceback"])).splitlines()[0] == (
        f"  Cell In[{number}], line 2"
    )
    assert run.error["evalue"] == (
        f"invalid syntax (<cluster:kt_code> in Cell In[{number}], line 2, column 13)"
    )


def test_cluster_get_cell_traceback_names_the_cell_run(kernels: tuple[Kernel, Kernel]) -> None:
    """An error in a %%cluster_get cell points at In[N] of that very cell, on its line."""
    ka, _ = kernels
    run = ka.run("%%cluster_get kt.zero\nx = 1\nx / 0\n")
    assert run.status == "error" and run.error is not None
    text = plain("\n".join(run.error["traceback"]))
    number = run.execution_count
    assert f"Cell In[{number}], line 3" in text and f"Cell In[{number + 1}]" not in text
    assert "----> 3 x / 0" in text


def read_iopub(
    kernel: Kernel, msg_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 30
) -> list[dict[str, Any]]:
    """The kernel's IOPub messages for request ``msg_id``, up to the first one ``until`` likes."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kernel.kc.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        seen.append(msg)
        if until(msg):
            return seen
    raise AssertionError(f"no such message in {timeout} s; seen {seen}")


def idle(msg: dict[str, Any]) -> bool:
    return msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"


def shown_lines(messages: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(message type, display id, text) of every display and display update."""
    return [
        (
            msg["msg_type"],
            msg["content"]["transient"]["display_id"],
            msg["content"]["data"]["text/plain"],
        )
        for msg in messages
        if msg["msg_type"] in ("display_data", "update_display_data")
    ]


@contextlib.contextmanager
def holding(hub: Cluster, key: str) -> Iterator[threading.Event]:
    """Another member computes ``key`` until the event is set (or 30 s pass)."""
    computing, release = threading.Event(), threading.Event()

    def slow() -> str:
        computing.set()
        release.wait(30)
        return "from holder"

    with clustorage.Node("kt-holder", hub.loader, cookie=COOKIE) as holder:
        worker = threading.Thread(target=holder.get, args=(key, slow), daemon=True)
        worker.start()
        try:
            assert computing.wait(30)
            yield release
        finally:
            release.set()
            worker.join(30)


def test_a_wait_on_a_lease_shows_who_computes_then_disappears(
    hub: Cluster, kernels: tuple[Kernel, Kernel]
) -> None:
    """While kt-holder computes the key: a line naming it, updated in place, then emptied."""
    ka, _ = kernels
    with holding(hub, "kt.slow") as release:
        msg_id = ka.kc.execute("%cluster_get kt.slow 'mine'")
        first = read_iopub(ka, msg_id, lambda msg: msg["msg_type"] == "update_display_data")
        release.set()
        rest = read_iopub(ka, msg_id, idle)
    lines = shown_lines(first + rest)
    kinds = [kind for kind, _, _ in lines]
    assert kinds[0] == "display_data" and set(kinds[1:]) == {"update_display_data"}
    assert len({display_id for _, display_id, _ in lines}) == 1  # one line, updated in place
    assert lines[0][2].startswith("waiting for 'kt.slow': kt-holder is computing it (")
    assert lines[-1][2] == ""  # gone once the value came
    results = [msg for msg in rest if msg["msg_type"] == "execute_result"]
    assert results[0]["content"]["data"]["text/plain"] == "'from holder'"


def interrupted_wait(
    hub: Cluster, kernel: Kernel, key: str, code: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run ``code``, a get of ``key`` that waits on another node's lease, and interrupt the
    kernel once its live line says it waits: the IOPub messages up to that line, and those
    after it until the kernel is idle."""
    with holding(hub, key):
        msg_id = kernel.kc.execute(code)
        first = read_iopub(kernel, msg_id, lambda msg: msg["msg_type"] == "display_data")
        kernel.km.interrupt_kernel()
        return first, read_iopub(kernel, msg_id, idle)


def test_interrupting_a_wait_on_a_lease_is_one_line(
    hub: Cluster, kernels: tuple[Kernel, Kernel]
) -> None:
    """A kernel interrupt while a get waits on another node's lease: one line, no internals."""
    _, kb = kernels
    first, rest = interrupted_wait(hub, kb, "kt.stuck", "%cluster_get kt.stuck 'mine'")
    errors = [msg["content"] for msg in rest if msg["msg_type"] == "error"]
    assert len(errors) == 1 and errors[0]["traceback"] == [
        "KeyboardInterrupt: stopped waiting for the value of 'kt.stuck', "
        "which kt-holder is computing"
    ]
    assert [msg for msg in rest if msg["msg_type"] == "stream"] == []
    assert shown_lines(first + rest)[-1][2] == ""
    assert kb.ok("%cluster_get kt.stuck").text == "'from holder'"


def test_interrupting_a_plain_get_is_one_line(hub: Cluster, kernels: tuple[Kernel, Kernel]) -> None:
    """The same with ``get`` itself (in the namespace, as in the shell): the live line while
    it waits, then one line at the interrupt."""
    _, kb = kernels
    first, rest = interrupted_wait(hub, kb, "kt.stuck2", "get('kt.stuck2', lambda: 'mine')")
    lines = shown_lines(first + rest)
    assert lines[0][2].startswith("waiting for 'kt.stuck2': kt-holder is computing it (")
    assert lines[-1][2] == ""
    errors = [msg["content"] for msg in rest if msg["msg_type"] == "error"]
    assert len(errors) == 1 and errors[0]["traceback"] == [
        "KeyboardInterrupt: stopped waiting for 'kt.stuck2'"
    ]
    assert kb.ok("get('kt.stuck2')").text == "'from holder'"


# -- the Jupyter protocol, by jupyter_kernel_test -----------------------------------------


class ClustorageKernelTests(jkt.KernelTests):
    """jupyter_kernel_test's suite on the installed kernelspec, a member of a real loader."""

    kernel_name = "clustorage"
    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [  # noqa: RUF012 (the suite's own attribute types)
        {"text": "zi", "matches": {"zip"}},
        {"text": "%cluster_sta", "matches": {"%cluster_start", "%cluster_status"}},
    ]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]  # noqa: RUF012
    incomplete_code_samples = ['print("""hello']  # noqa: RUF012
    invalid_code_samples = ["import = 7q"]  # noqa: RUF012
    code_page_something = "%cluster_get?"
    code_generate_error = "%cluster_get kt.missing"
    code_execute_result = [  # noqa: RUF012
        {"code": "1+2+3", "result": "6"},
        {"code": "%cluster_get kt.answer 6 * 7", "result": "42"},
        {"code": "kt_probe()", "result": "'probe'"},
        {"code": "%cluster_status", "mime": "text/html"},
    ]
    code_display_data = [  # noqa: RUF012
        {
            "code": "from IPython.display import HTML, display; display(HTML('<b>t</b>'))",
            "mime": "text/html",
        },
        {
            "code": "display(get_ipython().run_line_magic('cluster_status', ''))",
            "mime": "text/html",
        },
    ]
    code_history_pattern = "1?2*"
    # ipykernel answers a range request for session 0 with the real session number (1),
    # which this suite does not expect; plain ipykernel fails it the same way.
    supported_history_operations = ("tail", "search")
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"

    _tmp: Path
    _cluster: Cluster
    _kernel: Kernel

    @classmethod
    def setUpClass(cls) -> None:
        cls._tmp = Path(tempfile.mkdtemp(prefix="clustorage-jkt-"))
        cls._cluster = Cluster(cls._tmp)
        try:
            cls._cluster.start_loader("kt-hub")
            jupyter_path = install_kernelspec(cls._tmp / "prefix")
            env = isolated_env(
                cls._tmp / "home",
                jupyter_path,
                CLUSTORAGE_LOADER=cls._cluster.loader,
                CLUSTORAGE_NAME="kt",
                CLUSTORAGE_COOKIE=COOKIE,
            )
            cls._kernel = Kernel(jupyter_path, env, cls._tmp / "kt.json").wait_ready()
            cls.km, cls.kc = cls._kernel.km, cls._kernel.kc
            # A hot-load lands while the kernel is idle: it must not print into any cell.
            with clustorage.Node("kt-peer", cls._cluster.loader, cookie=COOKIE) as peer:
                peer.define("kt_probe", "lambda: 'probe'")
        except BaseException:
            cls._cleanup()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls._cleanup()

    @classmethod
    def _cleanup(cls) -> None:
        kernel = getattr(cls, "_kernel", None)
        try:
            if kernel is not None:
                kernel.close()
        finally:
            cls._cluster.close()
            shutil.rmtree(cls._tmp, ignore_errors=True)

    def test_hot_load_arrives_without_output(self) -> None:
        """A function defined elsewhere is callable here, and the cell shows only its result."""
        self.flush_channels()
        reply, outputs = self.execute_helper("kt_probe()")
        assert reply["content"]["status"] == "ok"
        assert [msg["msg_type"] for msg in outputs] == ["execute_result"]


def test_a_lost_loader_is_told_in_the_next_cell_not_under_the_last(
    jupyter_path: Path, tmp_path: Path
) -> None:
    """The loader goes away while the kernel is idle: nothing is written under the cell that
    ran last; the next cell starts with the line saying so."""
    (tmp_path / "own").mkdir()
    own = Cluster(tmp_path / "own")
    kernel: Kernel | None = None
    try:
        loader = own.start_loader("own")
        env = isolated_env(
            tmp_path / "home",
            jupyter_path,
            CLUSTORAGE_LOADER=own.loader,
            CLUSTORAGE_NAME="idle",
            CLUSTORAGE_COOKIE=COOKIE,
        )
        kernel = Kernel(jupyter_path, env, tmp_path / "idle.json").wait_ready()
        kernel.ok("clustorage.default_node().get('k', lambda: 1)")
        ran = kernel.ok("x = 1")  # done, and idle, before the loader goes
        last = ran.messages[0]["parent_header"]["msg_id"]
        loader.kill()
        loader.wait(10)
        later: list[dict[str, Any]] = []
        deadline = time.monotonic() + 3  # the node hears of it at once: the socket closed
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                later.append(kernel.kc.get_iopub_msg(timeout=0.2))
        under_last = [
            msg["content"]
            for msg in later
            if msg["msg_type"] == "stream" and msg["parent_header"].get("msg_id") == last
        ]
        assert under_last == []
        assert "idle: lost the loader own@" in kernel.ok("2").stderr
    finally:
        if kernel is not None:
            kernel.close()
        own.close()
