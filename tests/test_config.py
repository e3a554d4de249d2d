"""Configuration: addresses, names, the cookie and where it comes from, NodeConfig.resolve."""

from __future__ import annotations

import copy
import logging
import os
import pickle
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest

from clustorage.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    Cookie,
    LoaderAddress,
    NodeConfig,
    check_name,
    parse_listen,
    parse_loader,
    private_directory,
    private_file,
    resolve_cookie,
)
from clustorage.errors import ConfigError
from clustorage.hello import MAX_BACKLOG, max_backlog

SECRET = "s3cret-value-that-must-not-leak"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty home directory; the real ~/.clustorage is never touched."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CLUSTORAGE_COOKIE", raising=False)
    return tmp_path


def write_cookie(path: Path, text: str, mode: int = 0o600) -> Path:
    """A cookie file holding ``text`` with ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


# -- addresses --------------------------------------------------------------------------------


def test_default_host_and_port() -> None:
    """The documented defaults are 127.0.0.1 and 4370."""
    assert (DEFAULT_HOST, DEFAULT_PORT) == ("127.0.0.1", 4370)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("app1", LoaderAddress("app1", "127.0.0.1", 4370)),
        ("app1@10.0.0.5", LoaderAddress("app1", "10.0.0.5", 4370)),
        ("app1@10.0.0.5:5000", LoaderAddress("app1", "10.0.0.5", 5000)),
        ("app1@box.example.org:1", LoaderAddress("app1", "box.example.org", 1)),
        ("app1@[::1]:5000", LoaderAddress("app1", "::1", 5000)),
        ("app1@[::1]", LoaderAddress("app1", "::1", 4370)),
        ("app1@[fe80::1%eth0]:65535", LoaderAddress("app1", "fe80::1%eth0", 65535)),
        ("app1@:5000", LoaderAddress("app1", "127.0.0.1", 5000)),
    ],
)
def test_parse_loader(text: str, expected: LoaderAddress) -> None:
    """NAME[@HOST[:PORT]] with the defaults filled in, IPv6 in brackets."""
    assert parse_loader(text) == expected


def test_loader_address_str_round_trips() -> None:
    """str(LoaderAddress) is a string parse_loader reads back, IPv6 bracketed."""
    for address in (LoaderAddress("app1"), LoaderAddress("app1", "::1", 5000)):
        assert parse_loader(str(address)) == address
    assert str(LoaderAddress("app1", "::1", 5000)) == "app1@[::1]:5000"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ("127.0.0.1", 4370)),
        ("127.0.0.1:4370", ("127.0.0.1", 4370)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        (":5000", ("127.0.0.1", 5000)),
        ("example.org", ("example.org", 4370)),
        ("[::1]:5000", ("::1", 5000)),
        ("[::]", ("::", 4370)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    """HOST:PORT with defaults 127.0.0.1 and 4370; port 0 is allowed (the OS picks one)."""
    assert parse_listen(text) == expected


BAD_PORTS = ["host:abc", "host:65536", "host:99999999", "host:-1", "host:+80", "host: 80", "host:²"]


@pytest.mark.parametrize("text", BAD_PORTS)
def test_bad_listen_port_is_a_config_error(text: str) -> None:
    """A port that is not a number from 0 to 65535 raises ConfigError saying so."""
    with pytest.raises(ConfigError, match="port") as info:
        parse_listen(text)
    assert text in str(info.value)


@pytest.mark.parametrize("text", BAD_PORTS)
def test_bad_loader_port_is_a_config_error(text: str) -> None:
    """The same rule holds in a loader address, and the message quotes it."""
    with pytest.raises(ConfigError, match="port"):
        parse_loader(f"app1@{text}")


@pytest.mark.parametrize(
    ("text", "problem"),
    [("[::1", "']'"), ("[::1]5000", "PORT"), ("[::1]x:1", "PORT")],
)
def test_bad_ipv6_brackets_are_config_errors(text: str, problem: str) -> None:
    """An unclosed bracket or junk after ']' is named in the message."""
    with pytest.raises(ConfigError, match=problem):
        parse_listen(text)


@pytest.mark.parametrize("text", ["", "@host", "bad name@host", "a.b@host", "x" * 65])
def test_bad_loader_name_is_a_config_error(text: str) -> None:
    """The loader's name follows the node name rules."""
    with pytest.raises(ConfigError, match="loader name"):
        parse_loader(text)


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "app1", "APP_2", "node-3", "0", "_", "-", "x" * 64])
def test_valid_names(name: str) -> None:
    """1 to 64 characters from A-Z, a-z, 0-9, '_' and '-' are accepted as is."""
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "x" * 65, "a b", "a.b", "a/b", "é", "app1\n", "app\x00", "a@b", "a:b"]
)
def test_invalid_names(name: str) -> None:
    """Anything else raises ConfigError quoting the name and the rule."""
    with pytest.raises(ConfigError, match="1 to 64") as info:
        check_name(name)
    assert repr(name) in str(info.value)


def test_name_of_wrong_type() -> None:
    """A non-string name is a ConfigError, not a crash."""
    with pytest.raises(ConfigError):
        check_name(42)  # type: ignore[arg-type]


# -- cookie: where it comes from --------------------------------------------------------------


def test_cookie_argument_wins(home: Path) -> None:
    """An explicit cookie beats a cookie file, the environment and the home file."""
    file = write_cookie(home / "f", "from-file")
    write_cookie(home / ".clustorage" / "cookie", "from-home")
    env = {"CLUSTORAGE_COOKIE": "from-env"}
    assert resolve_cookie("from-arg", file, env).secret == b"from-arg"
    assert resolve_cookie(b"from-bytes", file, env).secret == b"from-bytes"
    assert resolve_cookie("from-arg", file, env).source == "--cookie"


def test_a_cookie_of_any_bytes_is_taken_as_those_bytes(home: Path) -> None:
    """A cookie file is bytes, not text: one that is not UTF-8 is its bytes. A cookie from
    the command line or the environment with undecodable bytes (surrogate escapes) is those
    bytes; text that cannot be bytes at all is a ConfigError naming where it came from."""
    file = home / "binary"
    file.write_bytes(b"\xff\xfe secret\n")
    file.chmod(0o600)
    assert resolve_cookie(None, file, {}).secret == b"\xff\xfe secret"
    escaped = os.fsdecode(b"\xffkey")
    assert resolve_cookie(escaped, None, {}).secret == b"\xffkey"
    assert resolve_cookie(None, None, {"CLUSTORAGE_COOKIE": escaped}).secret == b"\xffkey"
    with pytest.raises(ConfigError, match=r"cookie from \$CLUSTORAGE_COOKIE cannot be encoded"):
        resolve_cookie(None, None, {"CLUSTORAGE_COOKIE": "\ud800"})


def test_cookie_file_beats_environment(home: Path) -> None:
    """Without an argument, --cookie-file beats $CLUSTORAGE_COOKIE and the home file."""
    file = write_cookie(home / "f", "from-file")
    write_cookie(home / ".clustorage" / "cookie", "from-home")
    cookie = resolve_cookie(None, file, {"CLUSTORAGE_COOKIE": "from-env"})
    assert cookie.secret == b"from-file"
    assert str(file) in cookie.source


def test_environment_beats_home_file(home: Path) -> None:
    """Without argument or file, $CLUSTORAGE_COOKIE beats ~/.clustorage/cookie."""
    write_cookie(home / ".clustorage" / "cookie", "from-home")
    cookie = resolve_cookie(None, None, {"CLUSTORAGE_COOKIE": "from-env"})
    assert cookie.secret == b"from-env"


def test_environment_defaults_to_os_environ(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no env mapping given, the process environment is read."""
    monkeypatch.setenv("CLUSTORAGE_COOKIE", "from-os-env")
    assert resolve_cookie().secret == b"from-os-env"


def test_home_file_is_last(home: Path) -> None:
    """With nothing else, ~/.clustorage/cookie is read."""
    write_cookie(home / ".clustorage" / "cookie", "from-home")
    assert resolve_cookie(None, None, {}).secret == b"from-home"
    assert resolve_cookie(None, None, {"CLUSTORAGE_COOKIE": ""}).secret == b"from-home"


def test_cookie_object_passes_through(home: Path) -> None:
    """A Cookie given as the argument is used as it is."""
    cookie = Cookie(b"x", "test")
    assert resolve_cookie(cookie, None, {}) is cookie


def test_home_cookie_created_on_first_use(home: Path) -> None:
    """The home cookie file is made once, mode 0600, with a long random secret, then reused."""
    path = home / ".clustorage" / "cookie"
    assert not path.exists()
    first = resolve_cookie(None, None, {})
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert len(first.secret) >= 32
    assert path.read_text().strip().encode() == first.secret
    assert resolve_cookie(None, None, {}).secret == first.secret


def test_home_cookies_differ_between_homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two fresh homes get two different random secrets."""
    secrets = []
    for sub in ("one", "two"):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv("HOME", str(tmp_path / sub))
        secrets.append(resolve_cookie(None, None, {}).secret)
    assert secrets[0] != secrets[1]


def test_home_cookie_creation_race(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes creating the home cookie at once end up sharing one secret, none crashes."""
    for attempt in range(20):
        monkeypatch.setenv("HOME", str(home / str(attempt)))
        gate = threading.Barrier(6)
        secrets: list[bytes] = []

        def race(gate: threading.Barrier, secrets: list[bytes]) -> None:
            gate.wait()
            secrets.append(resolve_cookie(None, None, {}).secret)

        threads = [threading.Thread(target=race, args=(gate, secrets)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert len(secrets) == 6 and len(set(secrets)) == 1


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666])
def test_readable_home_cookie_is_refused(home: Path, mode: int) -> None:
    """A home cookie file readable by group or others raises ConfigError saying chmod 600."""
    path = write_cookie(home / ".clustorage" / "cookie", "from-home", mode)
    with pytest.raises(ConfigError, match="chmod 600") as info:
        resolve_cookie(None, None, {})
    assert str(path) in str(info.value)
    assert "from-home" not in str(info.value)


def test_readable_cookie_file_is_refused(home: Path) -> None:
    """An explicit --cookie-file readable by others is refused the same way."""
    path = write_cookie(home / "f", "from-file", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        resolve_cookie(None, path, {})


def test_missing_cookie_file_is_a_config_error(home: Path) -> None:
    """A --cookie-file that does not exist is not created: ConfigError naming it."""
    path = home / "nope"
    with pytest.raises(ConfigError, match="nope"):
        resolve_cookie(None, path, {})
    assert not path.exists()


@pytest.mark.parametrize("secret", ["", b""])
def test_empty_cookie_is_a_config_error(home: Path, secret: str | bytes) -> None:
    """An empty secret is refused, whatever its source."""
    with pytest.raises(ConfigError, match="empty"):
        resolve_cookie(secret, None, {})


def test_empty_cookie_file_is_a_config_error(home: Path) -> None:
    """A cookie file holding only whitespace is refused."""
    path = write_cookie(home / "f", "   ")
    with pytest.raises(ConfigError, match="empty"):
        resolve_cookie(None, path, {})


# -- cookie: never shown, never pickled ---------------------------------------------------------


def test_cookie_repr_and_str_hide_the_secret() -> None:
    """repr, str and format of a Cookie never contain the secret."""
    cookie = Cookie(SECRET.encode(), "--cookie")
    for text in (repr(cookie), str(cookie), f"{cookie}", f"{cookie!r}", repr([cookie])):
        assert SECRET not in text
        assert SECRET.encode().hex() not in text


def test_node_config_repr_hides_the_secret(home: Path) -> None:
    """A NodeConfig's repr does not show the cookie's secret."""
    config = NodeConfig.resolve(name="app1", cookie=SECRET, env={})
    assert SECRET not in repr(config)


@pytest.mark.parametrize(
    "dumps", [pickle.dumps, cloudpickle.dumps, copy.copy, copy.deepcopy], ids=lambda f: f.__name__
)
def test_cookie_cannot_be_pickled(dumps: object) -> None:
    """pickle, cloudpickle and copy refuse a Cookie with TypeError."""
    with pytest.raises(TypeError, match="Cookie"):
        dumps(Cookie(SECRET.encode(), "--cookie"))  # type: ignore[operator]


def test_node_config_cannot_be_pickled(home: Path) -> None:
    """The cookie travels with a NodeConfig, so a NodeConfig cannot be pickled either."""
    config = NodeConfig.resolve(name="app1", cookie=SECRET, env={})
    with pytest.raises(TypeError):
        pickle.dumps(config)


def test_cookies_compare_by_secret() -> None:
    """Two Cookies are equal when their secrets are, whatever their source."""
    assert Cookie(b"a", "x") == Cookie(b"a", "y")
    assert Cookie(b"a", "x") != Cookie(b"b", "x")
    assert hash(Cookie(b"a", "x")) == hash(Cookie(b"b", "y"))


# -- NodeConfig.resolve -------------------------------------------------------------------------

ENV = {
    "CLUSTORAGE_NAME": "app3",
    "CLUSTORAGE_LOADER": "app1@10.0.0.1:5000",
    "CLUSTORAGE_COOKIE": SECRET,
    "CLUSTORAGE_LISTEN": "0.0.0.0:4400",
    "CLUSTORAGE_DATA": "/srv/clustorage",
}


def test_resolve_reads_the_environment(home: Path) -> None:
    """NAME, LOADER, COOKIE, LISTEN and DATA come from CLUSTORAGE_* variables."""
    config = NodeConfig.resolve(env=ENV)
    assert config.name == "app3"
    assert config.loader == LoaderAddress("app1", "10.0.0.1", 5000)
    assert config.cookie.secret == SECRET.encode()
    assert config.listen == ("0.0.0.0", 4400)
    assert config.data == "/srv/clustorage"
    assert config.database == os.path.join("/srv/clustorage", "app3.sqlite3")
    assert not config.is_loader


def test_arguments_beat_the_environment(home: Path) -> None:
    """Explicit arguments win over every CLUSTORAGE_* variable."""
    config = NodeConfig.resolve(
        name="app4",
        loader="app2",
        cookie="arg",
        listen="127.0.0.1:1",
        data=":memory:",
        env=ENV,
    )
    assert config.name == "app4"
    assert config.loader == LoaderAddress("app2")
    assert config.cookie.secret == b"arg"
    assert config.listen == ("127.0.0.1", 1)
    assert config.database == ":memory:"


def test_defaults(home: Path) -> None:
    """With nothing set: a generated valid name, no loader (so this is it), default listen."""
    config = NodeConfig.resolve(cookie="c", env={})
    assert check_name(config.name) == config.name
    assert config.loader is None
    assert config.is_loader
    assert config.listen == (DEFAULT_HOST, DEFAULT_PORT)
    assert config.database == str(home / ".clustorage" / "data" / f"{config.name}.sqlite3")


@pytest.mark.parametrize("loader", ["app1", "app1@127.0.0.1:4370", "app1@[::1]:5000"])
def test_loader_naming_itself_is_the_loader(home: Path, loader: str) -> None:
    """A node whose --loader names itself is the loader."""
    config = NodeConfig.resolve(name="app1", loader=loader, cookie="c", env={})
    assert config.loader is None
    assert config.is_loader


def test_loader_naming_itself_through_the_environment(home: Path) -> None:
    """CLUSTORAGE_NAME equal to CLUSTORAGE_LOADER's name also means 'I am the loader'."""
    env = {**ENV, "CLUSTORAGE_NAME": "app1"}
    assert NodeConfig.resolve(env=env).is_loader


def test_resolve_rejects_a_bad_name(home: Path) -> None:
    """An invalid CLUSTORAGE_NAME is a ConfigError."""
    with pytest.raises(ConfigError, match="node name"):
        NodeConfig.resolve(env={**ENV, "CLUSTORAGE_NAME": "bad name"})


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "soon"])
def test_resolve_rejects_a_bad_timeout(home: Path, timeout: str) -> None:
    """A CLUSTORAGE_TIMEOUT that is not a positive number of seconds is a ConfigError."""
    with pytest.raises(ConfigError, match="timeout"):
        NodeConfig.resolve(env={**ENV, "CLUSTORAGE_TIMEOUT": timeout})


def test_resolve_rejects_a_bad_max_frame(home: Path) -> None:
    """A CLUSTORAGE_MAX_FRAME that is not a number is a ConfigError, not a bare ValueError."""
    with pytest.raises(ConfigError):
        NodeConfig.resolve(env={**ENV, "CLUSTORAGE_MAX_FRAME": "big"})


@pytest.fixture
def umask_022() -> Iterator[None]:
    """This process's umask is 022 (the usual one) for the test."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_private_directory_makes_each_missing_folder_0700(tmp_path: Path, umask_022: None) -> None:
    """Every folder private_directory makes, parents included, is 0700 under umask 022."""
    made = private_directory(tmp_path / "a" / "b" / "c")
    for folder in (tmp_path / "a", tmp_path / "a" / "b", made):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert made == tmp_path / "a" / "b" / "c"


def test_private_directory_warns_about_an_open_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder the user opened to others is left as it is, with a warning naming it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="clustorage.config"):
        private_directory(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    assert f"{shared} is open to group or others (mode 755)" in caplog.text


def test_private_file_creates_or_tightens_to_0600(tmp_path: Path) -> None:
    """private_file creates a file 0600 under umask 0, and makes a 0644 one 0600."""
    old = os.umask(0)
    try:
        made = private_file(tmp_path / "new")
    finally:
        os.umask(old)
    left = tmp_path / "left"
    left.write_text("kept")
    left.chmod(0o644)
    private_file(left)
    assert stat.S_IMODE(made.stat().st_mode) == 0o600
    assert (stat.S_IMODE(left.stat().st_mode), left.read_text()) == (0o600, "kept")


def test_home_cookie_folder_is_private_under_umask_022(home: Path, umask_022: None) -> None:
    """The cookie made on first use, and the ~/.clustorage made for it, are 0600 and 0700."""
    resolve_cookie(env={})
    assert stat.S_IMODE((home / ".clustorage").stat().st_mode) == 0o700
    assert stat.S_IMODE((home / ".clustorage" / "cookie").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("text", "expected"), [("", MAX_BACKLOG), ("1048576", 1 << 20), ("268435456", 256 << 20)]
)
def test_max_backlog_from_the_environment(text: str, expected: int) -> None:
    """$CLUSTORAGE_MAX_BACKLOG sets the loader's backlog cap per member, 128 MiB by default."""
    assert max_backlog({"CLUSTORAGE_MAX_BACKLOG": text}) == expected


@pytest.mark.parametrize("text", ["lots", "-1", "1000", "1e9"])
def test_a_bad_max_backlog_is_a_config_error(text: str) -> None:
    """A backlog cap that is not a number of bytes of at least 1 MiB is refused, saying so."""
    with pytest.raises(ConfigError, match="CLUSTORAGE_MAX_BACKLOG"):
        max_backlog({"CLUSTORAGE_MAX_BACKLOG": text})


def test_the_command_that_starts_a_loader_can_be_pasted_as_it_is(tmp_path: Path) -> None:
    """An IPv6 address in brackets, a path with a space quoted, and over TLS the CA."""
    import shlex

    from clustorage.config import loader_command

    cookie = tmp_path / "my cookies" / "cookie"
    cookie.parent.mkdir()
    cookie.write_text("c" * 24)
    cookie.chmod(0o600)
    config = NodeConfig.resolve(
        name="m", loader="app1@[::1]:45999", cookie_file=str(cookie), env={}
    )
    command, elsewhere = loader_command(config)
    assert elsewhere is None
    assert shlex.split(command) == [
        "clustorage", "loader", "--name", "app1", "--listen", "[::1]:45999",
        "--cookie-file", str(cookie),
    ]  # fmt: skip
    assert parse_listen(shlex.split(command)[5]) == ("::1", 45999)
    by_env = NodeConfig.resolve(name="m", loader="app1", env={"CLUSTORAGE_COOKIE": "c" * 24})
    assert loader_command(by_env) == (
        "clustorage loader --name app1 --listen 127.0.0.1:4370",
        "$CLUSTORAGE_COOKIE",
    )
