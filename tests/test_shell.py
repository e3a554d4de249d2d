"""clustorage-shell: real shells in a private tmux server, typed into like a user would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clustorage import LoadEvent
from clustorage.shell_complete import cluster_completions
from clustorage.shell_ui import Snapshot, notice_text, toolbar_fragments
from clustorage.shell_wait import waiting_text
from tests.conftest import ROOT, free_port
from tests.tmux_helpers import Tmux, require_tmux, shell_command

pytestmark = pytest.mark.timeout(90)

SUM = "call('sum', [1, 4], lambda: \"def sum(a, b):\\n    return a + b\\n\")"


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTORAGE_")}
    return dict(env, HOME=str(home), CLUSTORAGE_TIMEOUT="5")


def toolbar_has(text: str) -> Callable[[str], bool]:
    """A screen predicate: the bottom line (the toolbar) contains ``text``."""

    def check(screen: str) -> bool:
        lines = screen.splitlines()
        return bool(lines) and text in lines[-1]

    return check


def _cookie_file(directory: Path) -> Path:
    path = directory / "cookie"
    path.write_text("shell-test-cookie-not-secret\n")
    path.chmod(0o600)
    return path


class Shells:
    """A loader shell app1 and member shells, in one private tmux server."""

    def __init__(self, tmp: Path, data: str = ":memory:") -> None:
        home = tmp / "home"
        home.mkdir(exist_ok=True)
        self.home = home
        self.cookie = _cookie_file(tmp)
        self.port = free_port()
        self.data = data
        self.tmux = Tmux(_env(home))

    def loader(self, name: str = "app1") -> None:
        flags = ["--listen", f"127.0.0.1:{self.port}", "--data", self.data]
        self.tmux.spawn(name, shell_command(name, *flags, "--cookie-file", str(self.cookie)))
        self.tmux.wait_for(name, f"{name}> ")
        self.tmux.wait_for(name, toolbar_has(f" {name} | loader | "))

    def member(self, name: str, loader: str = "app1") -> None:
        flags = ["--loader", f"{loader}@127.0.0.1:{self.port}", "--cookie-file", str(self.cookie)]
        self.tmux.spawn(name, shell_command(name, *flags))
        self.tmux.wait_for(name, f"{name}> ")
        self.tmux.wait_for(name, toolbar_has(f" {name} | member | "))

    def run(self, window: str, line: str, expected: str | re.Pattern[str]) -> str:
        """Type ``line``, press Enter, wait for ``expected`` and the next prompt after it."""
        self.tmux.send(window, line, "Enter")
        prompt = f"{window}> "

        def done(screen: str) -> bool:
            if isinstance(expected, str):
                at = screen.rfind(expected)
                end = at + len(expected) if at >= 0 else -1
            else:
                found = list(expected.finditer(screen))
                end = found[-1].end() if found else -1
            return end >= 0 and prompt in screen[end:]

        return self.tmux.wait_for(window, done)


@pytest.fixture(scope="module")
def shells(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shells]:
    """A loader shell app1 and a member shell app2, shared by this module's tests."""
    require_tmux()
    shells = Shells(tmp_path_factory.mktemp("shells"))
    try:
        shells.loader("app1")
        shells.member("app2")
        shells.tmux.wait_for("app1", toolbar_has("| 2 nodes |"))
        yield shells
    finally:
        shells.tmux.close()


# -- pure parts ----------------------------------------------------------------------------


def test_completions_offer_keys_and_functions_where_they_fit() -> None:
    """Keys complete inside get(' and %cluster_get, functions inside call(' and as bare names."""
    keys, functions = ["hello", "user.42"], ["sum", "square"]
    assert cluster_completions("get('he", keys, functions).names == ["hello"]
    assert cluster_completions("%cluster_get us", keys, functions).names == ["user.42"]
    assert cluster_completions('call("s', keys, functions).names == ["sum", "square"]
    assert cluster_completions("%%cluster_call su", keys, functions).names == ["sum"]
    bare = cluster_completions("x = sq", keys, functions)
    assert (bare.names, bare.exclusive) == (["square"], False)
    assert cluster_completions("obj.su", keys, functions).names == []


def test_toolbar_shows_role_loader_state_and_counts() -> None:
    """The toolbar names the role, the loader's state and the node, key and function counts."""
    member = Snapshot("app2", "member", "app1", True, ("app1", "app2"), ("hello",), ())
    text = "".join(part[1] for part in toolbar_fragments(member))
    assert "app2 | member | loader app1: connected | 2 nodes | 1 key | 0 functions" in text
    lost = member._replace(connected=False)
    assert "loader app1: reconnecting" in "".join(part[1] for part in toolbar_fragments(lost))


def test_notice_text_names_version_and_origin() -> None:
    """A remote definition reads like 'sum v2 loaded from app3'."""
    event = LoadEvent("function", "sum", 2, "app3", None, "def sum(a, b): ...")
    assert notice_text(event) == "[cluster] sum v2 loaded from app3"
    value = LoadEvent("value", "hello", 1, "app1", "world", None)
    assert notice_text(value) == "[cluster] value 'hello' v1 loaded from app1"


def test_waiting_text_names_the_holder_and_the_time() -> None:
    """Waits over a second read 'waiting 3s for KEY: HOLDER computes it'; shorter ones nothing."""
    assert waiting_text([("k", "app3", 100.5)], 101.0) is None
    assert waiting_text([("k", "app3", 97.0)], 100.0) == "waiting 3s for 'k': app3 computes it"
    two = waiting_text([("a", "app1", 98.0), ("b", "app3", 90.0)], 100.0)
    assert two == "waiting 10s for 'b': app3 computes it (and 1 more)"
    written = waiting_text([("k", "", 97.0)], 100.0)  # behind a write, which nobody holds
    assert written == "waiting 3s for 'k': it is being written"


# -- real shells ---------------------------------------------------------------------------


def test_prompt_banner_and_toolbar(shells: Shells) -> None:
    """Each shell shows its NAME> prompt and a toolbar with its role and the node count."""
    screen = shells.tmux.capture("app2")
    assert "member of app1@127.0.0.1:" in screen
    assert re.search(r"app2 \| member \| loader app1: connected \| 2 nodes", screen)
    assert "app1 | loader | 2 nodes" in shells.tmux.toolbar("app1")


def test_get_computes_once_for_the_cluster(shells: Shells) -> None:
    """get('hello', ...) in app1 computes 'world'; app2 gets 'world' without running its fn."""
    shells.run("app1", "get('hello', lambda: 'world')", "'world'")
    screen = shells.run("app2", "get('hello', lambda: 1 / 0)", "'world'")
    assert "ZeroDivisionError" not in screen


def test_function_from_call_is_callable_by_bare_name_elsewhere(shells: Shells) -> None:
    """A function defined with call in app1 is callable as sum(...) in app2."""
    shells.run("app1", SUM, "\n5\n")
    shells.run("app2", "sum(20, 22)", "\n42\n")


def test_remote_definition_notice_keeps_half_typed_line(shells: Shells) -> None:
    """A notice of app1's definition appears above app2's prompt; the half-typed line stays."""
    tmux = shells.tmux
    tmux.send("app2", "x = 'half typed")
    tmux.wait_for("app2", "app2> x = 'half typed")
    shells.run(
        "app1", "node.define('mul', 'def mul(a, b):\\n    return a * b\\n').version", "\n1\n"
    )
    screen = tmux.wait_for("app2", "[cluster] mul v1 loaded from app1")
    lines = screen.splitlines()
    at = max(i for i, line in enumerate(lines) if "mul v1 loaded from app1" in line)
    assert lines[at + 1] == "app2> x = 'half typed", screen
    shells.run("app2", "' + '!'; x", "'half typed!'")
    shells.run("app2", "mul(6, 7)", "\n42\n")


def test_redefinition_is_seen_live(shells: Shells) -> None:
    """Redefining a function in app2 shows 'v2 loaded from app2' in app1 and takes effect."""
    shells.run("app2", "node.define('cube', 'lambda x: x ** 3').version", "\n1\n")
    shells.run("app2", "node.define('cube', 'lambda x: x * x * x + 0').version", "\n2\n")
    shells.tmux.wait_for("app1", "[cluster] cube v2 loaded from app2")
    shells.run("app1", "cube(3)", "\n27\n")


def test_errors_show_source_and_keep_the_shell(shells: Shells) -> None:
    """A failing hot-loaded function shows its source line; the shell and node carry on."""
    shells.run(
        "app2", "node.define('div', 'def div(a, b):\\n    return a / b\\n').version", "\n1\n"
    )
    screen = shells.run("app2", "div(1, 0)", "ZeroDivisionError")
    assert "<cluster:div>" in screen and "return a / b" in screen
    shells.run("app2", "get('hello')", "'world'")
    screen = shells.run("app2", "get('boom', lambda: int('boom'))", "invalid literal")
    shown = screen.rsplit("app2> get('boom'", 1)[1]
    assert "Traceback" in shown and "lambda: int('boom')" in shown
    assert "node.py" not in shown  # from the prompt's line straight to the fn


def test_completion_of_cluster_keys(shells: Shells) -> None:
    """Tab after get('completion_k completes the key app1 stored."""
    shells.run("app1", "get('completion_key', lambda: 'completed')", "'completed'")
    shells.tmux.send("app2", "get('completion_k", "Tab")
    shells.tmux.wait_for("app2", "app2> get('completion_key")
    shells.run("app2", "')", "'completed'")


def test_cluster_status_magic(shells: Shells) -> None:
    """%cluster_status in a shell lists the loader and the members."""
    screen = shells.run("app2", "%cluster_status", re.compile(r"app2 \(this node\)\s+member"))
    assert re.search(r"app1\s+loader", screen)


def test_toolbar_shows_who_computes_a_key_being_waited_for(shells: Shells) -> None:
    """While app2's get waits on app1's lease, app2's bottom row names app1 and the wait's
    length; once the value comes, the row is gone and the value printed."""
    tmux = shells.tmux
    mark, go = shells.home / "computing", shells.home / "go"
    shells.run("app1", "import pathlib, time", "app1> import pathlib, time")
    touch = f"pathlib.Path({str(mark)!r}).touch()"
    until_go = f"[time.sleep(0.05) for _ in iter(pathlib.Path({str(go)!r}).exists, True)]"
    tmux.send("app1", f"get('slow_key', lambda: ({touch}, {until_go}, 'slow done')[-1])", "Enter")
    deadline = time.monotonic() + 20
    while not mark.exists():  # app1 holds the lease
        assert time.monotonic() < deadline
        time.sleep(0.05)
    tmux.send("app2", "get('slow_key', lambda: 'not computed here')", "Enter")
    waiting = re.compile(r"app2 \| member \| waiting \d+s for 'slow_key': app1 computes it")
    tmux.wait_for("app2", lambda screen: bool(waiting.search(screen.splitlines()[-1])))
    go.touch()
    screen = tmux.wait_for("app2", re.compile(r"'slow done'\n(.*\n)*app2> $", re.MULTILINE))
    assert "waiting" not in screen.splitlines()[-1]
    assert "not computed here" not in screen.replace("lambda: 'not computed here'", "")


def test_third_shell_joins_and_leaves_with_ctrl_d(shells: Shells) -> None:
    """A third shell raises the node count, sees earlier functions, and Ctrl-D exits with 0."""
    tmux = shells.tmux
    shells.member("app3")
    tmux.wait_for("app1", toolbar_has("| 3 nodes |"))
    tmux.wait_for("app2", toolbar_has("| 3 nodes |"))
    shells.run("app3", "sum(1, 1)", "\n2\n")
    tmux.send("app3", "", "C-d")
    assert tmux.wait_exit("app3") == 0
    assert "app3 left the cluster." in tmux.capture("app3")
    tmux.wait_for("app1", toolbar_has("| 2 nodes |"))
    history = (shells.home / ".clustorage" / "history" / "app3").read_text()
    assert "sum(1, 1)" in history


def test_cluster_stop_and_start_are_followed(shells: Shells) -> None:
    """After %cluster_stop and %cluster_start the prompt and toolbar follow the new node."""
    tmux = shells.tmux
    shells.member("app4")
    shells.run("app4", "%cluster_stop", "stopped node app4")
    tmux.wait_for("app4", toolbar_has("no node runs here"))
    start = f"%cluster_start --name app5 --loader app1@127.0.0.1:{shells.port}"
    tmux.send("app4", f"{start} --cookie-file {shells.cookie}", "Enter")
    tmux.wait_for("app4", toolbar_has(" app5 | member | loader app1: connected | 3 nodes"))
    tmux.send("app4", "get('hello')", "Enter")
    tmux.wait_for("app4", "app5> get('hello')\n'world'\napp5> ")
    assert "lost loader" not in tmux.capture("app4")
    tmux.send("app4", "", "C-d")
    assert tmux.wait_exit("app4") == 0


def test_loader_ctrl_d_tells_members_and_keeps_data(tmp_path: Path) -> None:
    """Ctrl-D on the loader's shell exits 0, members see it go and come back (one line
    each), and its data survives."""
    shells = Shells(tmp_path, data=str(tmp_path / "data"))
    tmux = shells.tmux
    try:
        shells.loader("app1")
        shells.member("app2")
        shells.run("app2", "get('kept', lambda: 'safe')", "'safe'")
        tmux.send("app1", "", "C-d")
        assert tmux.wait_exit("app1") == 0
        tmux.wait_for("app2", "[cluster] lost loader app1")
        tmux.wait_for("app2", toolbar_has("loader app1: reconnecting"))
        tmux.run("kill-window", "-t", tmux.target("app1"))
        shells.loader("app1")
        screen = tmux.wait_for("app2", "[cluster] reconnected to loader app1", timeout=30)
        said = screen.split("app2> get('kept', lambda: 'safe')\n'safe'\n", 1)[1]
        assert said.splitlines()[:3] == [
            "[cluster] lost loader app1; reconnecting (loaded values and functions still work)",
            "[cluster] reconnected to loader app1",
            "app2> ",
        ]
        shells.run("app1", "get('kept')", "'safe'")
    finally:
        tmux.close()


def test_startup_bench_quick_mode() -> None:
    """bench/startup.py --quick measures launch-to-prompt for a loader and a member shell."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "startup.py"), "--quick"],
        env={k: v for k, v in os.environ.items() if not k.startswith("CLUSTORAGE_")},
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"loader shell\s+median\s+\d+\.\d+ s", done.stdout)
    assert re.search(r"member shell \(joining\)\s+median\s+\d+\.\d+ s", done.stdout)


def test_shell_named_in_its_loader_address_is_the_loader_there(tmp_path: Path) -> None:
    """--name app7 --loader app7@127.0.0.1:PORT: this shell is the loader, listening on PORT."""
    home = tmp_path / "home"
    home.mkdir()
    cookie = _cookie_file(tmp_path)
    port = free_port()
    address = f"app7@127.0.0.1:{port}"
    tmux = Tmux(_env(home))
    try:
        flags = ("--loader", address, "--cookie-file", str(cookie))
        tmux.spawn("app7", shell_command("app7", *flags, "--data", ":memory:"))
        tmux.wait_for("app7", toolbar_has(" app7 | loader | "))
        screen = tmux.capture("app7")
        assert f"the loader, on 127.0.0.1:{port}; members join with --loader {address}" in screen
        tmux.spawn("app8", shell_command("app8", *flags))
        tmux.wait_for("app8", toolbar_has(" app8 | member | loader app7: connected | 2 nodes"))
    finally:
        tmux.close()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--loader", "app1@127.0.0.1:1", "--data", "DATA"), "--data is a loader's option"),
        (("--listen", "nonsense", "--data", "DATA"), "--listen 'nonsense': cannot resolve host"),
    ],
)
def test_shell_refuses_flags_it_cannot_honour(
    tmp_path: Path, flags: tuple[str, ...], expected: str
) -> None:
    """--data on a member, or a --listen that cannot work, exit 2 naming it; nothing is made."""
    home = tmp_path / "home"
    home.mkdir()
    data = tmp_path / "data"
    argv = shell_command("app2", *(str(data) if flag == "DATA" else flag for flag in flags))
    done = subprocess.run(
        [*argv, "--cookie", "c"], env=_env(home), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr
    assert not data.exists() and list(home.iterdir()) == []
