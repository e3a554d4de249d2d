"""Node configuration: names, addresses, the cookie, the data directory.

Flags win over environment variables, which win over files (SPEC "Addresses and cookie").
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import secrets
import shlex
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)
__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "MEMORY",
    "Cookie",
    "LoaderAddress",
    "NodeConfig",
    "check_name",
    "clustorage_home",
    "generated_name",
    "loader_command",
    "parse_listen",
    "parse_loader",
    "private_directory",
    "private_file",
    "resolve_cookie",
    "resolve_tls",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4370
DEFAULT_TIMEOUT = 5.0
DEAD_AFTER = 15.0  # seconds before a peer host that stopped answering is taken for dead
EAGER_LIMIT = 1 << 20  # bytes: a bigger value is announced, and sent to nodes that get it
DEFAULT_MAX_FRAME = 1 << 30
MEMORY = ":memory:"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_name(name: str, what: str = "node name") -> str:
    """Return ``name`` if it is a valid node name, else raise ConfigError saying why."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"invalid {what} {name!r}: use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'"
        )
    return name


def generated_name() -> str:
    """A node name unique on this machine: host, process id and a random suffix."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", platform.node().split(".")[0])[:32] or "node"
    return f"{host}-{os.getpid()}-{secrets.token_hex(2)}"


def clustorage_home() -> Path:
    """``~/.clustorage``: cookie, history and default data live here."""
    return Path.home() / ".clustorage"


def private_directory(path: Path) -> Path:
    """Make ``path`` and its missing parents private to this user (0700), whatever the umask.

    A folder that exists already is left as it is; one that group or others may enter gets
    a logged warning (the user may have opened it on purpose), not a refusal.
    """
    missing = [folder for folder in (path, *path.parents) if not folder.exists()]
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            folder.mkdir(mode=0o700)
            os.chmod(folder, 0o700)  # mkdir's mode passes through the umask
    if path not in missing:
        with contextlib.suppress(OSError):
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                log.warning(
                    "%s is open to group or others (mode %o): what Clustorage keeps there "
                    "may be read by other users; run: chmod 700 %s",
                    path,
                    mode,
                    path,
                )
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty, or make it, private to this user (0600), whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return path


def _split_host_port(text: str, default_port: int, what: str) -> tuple[str, int]:
    host, port = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"invalid {what} {text!r}: missing ']' after an IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigError(f"invalid {what} {text!r}: expected ':PORT' after ']'")
        port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not port:
        return host or DEFAULT_HOST, default_port
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"invalid {what} {text!r}: port must be a number from 0 to 65535")
    return host or DEFAULT_HOST, int(port)


def parse_listen(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6); port 0 asks the OS for a free one."""
    return _split_host_port(text, DEFAULT_PORT, "listen address")


@dataclass(frozen=True, slots=True)
class LoaderAddress:
    """Where a member finds the loader, and the name the loader must answer with."""

    name: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    # More loaders of this name (standbys on one PostgreSQL store), tried in turn.
    standbys: tuple[tuple[str, int], ...] = ()

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        """Every listed address of the loader, the first one first."""
        return ((self.host, self.port), *self.standbys)

    def __str__(self) -> str:
        where = ",".join(_show(host, port) for host, port in self.addresses)
        return f"{self.name}@{where}"


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_loader(text: str) -> LoaderAddress:
    """Parse ``NAME[@HOST[:PORT][,HOST[:PORT]...]]`` (defaults 127.0.0.1 and 4370); several
    addresses name the active loader and its standbys, in the order members try them."""
    name, _, where = text.partition("@")
    check_name(name, "loader name")
    if not where:
        return LoaderAddress(name)
    addresses = [
        _split_host_port(part.strip(), DEFAULT_PORT, "loader address") for part in where.split(",")
    ]
    (host, port), *standbys = addresses
    return LoaderAddress(name, host, port, tuple(standbys))


class Cookie:
    """The cluster secret. Never shown in ``repr``/``str`` and never pickled."""

    __slots__ = ("_secret", "source")

    def __init__(self, secret: bytes, source: str) -> None:
        if not secret:
            raise ConfigError(f"the cookie from {source} is empty; set a non-empty secret")
        self._secret = secret
        self.source = source

    @property
    def secret(self) -> bytes:
        return self._secret

    def __repr__(self) -> str:
        return f"<Cookie from {self.source}>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cookie) and secrets.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(Cookie)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a clustorage Cookie cannot be pickled: it is the cluster's secret")


def _create_cookie_file(path: Path) -> None:
    """Write a fresh secret to ``path`` atomically; a node that races us keeps the winner's."""
    private_directory(path.parent)
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(draft, path)
    finally:
        draft.unlink()


def _read_cookie_file(path: Path, *, create: bool) -> Cookie:
    if create and not path.exists():
        _create_cookie_file(path)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read cookie file {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"cookie file {path} is readable by group or others (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )
    try:
        secret = path.read_bytes().strip()  # any bytes: a key, not text
    except OSError as exc:
        raise ConfigError(f"cannot read cookie file {path}: {exc.strerror}") from exc
    return Cookie(secret, f"file {path}")


def _cookie_bytes(text: str, source: str) -> Cookie:
    """The bytes of a cookie given as text: those of the command line or the environment,
    undecodable ones included (surrogate escapes, as Python reads them)."""
    try:
        return Cookie(text.encode("utf-8", "surrogateescape"), source)
    except UnicodeEncodeError as exc:
        raise ConfigError(
            f"the cookie from {source} cannot be encoded ({exc.reason} at character "
            f"{exc.start}); use a cookie of plain characters, e.g. from 'openssl rand -hex 32'"
        ) from None


def resolve_cookie(
    cookie: str | bytes | Cookie | None = None,
    cookie_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Cookie:
    """The cookie; first found wins: argument, file, $CLUSTORAGE_COOKIE, ~/.clustorage/cookie.

    Raises:
        ConfigError: the cookie is empty, or a cookie file is unreadable or group/other readable.
    """
    env = os.environ if env is None else env
    if isinstance(cookie, Cookie):
        return cookie
    if cookie is not None:
        if isinstance(cookie, str):
            return _cookie_bytes(cookie, "--cookie")
        return Cookie(bytes(cookie), "--cookie")
    if cookie_file is not None:
        return _read_cookie_file(Path(cookie_file), create=False)
    if env.get("CLUSTORAGE_COOKIE"):
        return _cookie_bytes(env["CLUSTORAGE_COOKIE"], "$CLUSTORAGE_COOKIE")
    return _read_cookie_file(clustorage_home() / "cookie", create=True)


def resolve_tls(
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
    ca: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None = None,
) -> tuple[str, str, str]:
    """The TLS files (certificate, key, CA) from arguments, else ``$CLUSTORAGE_TLS_*``: all
    three, or three empty strings for none (a node without TLS).

    Raises:
        ConfigError: some but not all of the three are given, naming the missing ones.
    """
    env = os.environ if env is None else env
    given = {
        what: os.fspath(value) if value else env.get(f"CLUSTORAGE_TLS_{what.upper()}", "")
        for what, value in (("cert", cert), ("key", key), ("ca", ca))
    }
    missing = [
        f"--tls-{what} (or $CLUSTORAGE_TLS_{what.upper()})" for what, v in given.items() if not v
    ]
    if missing and len(missing) < 3:
        raise ConfigError(
            f"TLS needs a certificate, its key and the cluster's CA: missing {', '.join(missing)}; "
            f"'clustorage tls init DIR' makes them"
        )
    return given["cert"], given["key"], given["ca"]


def _number(text: str | None, default: float, what: str) -> float:
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"invalid {what} {text!r}: use a number") from None


def _own_address(
    address: LoaderAddress, text: str | LoaderAddress | None, listen: tuple[str, int] | None
) -> tuple[str, int] | None:
    """Where a node that names itself as the loader listens: ``listen`` if given (behind a
    forwarded port it may differ), else the address of ``NAME@HOST:PORT``, else None."""
    if listen is not None:
        return listen
    if isinstance(text, str) and "@" not in text:
        return None  # NAME alone says nothing of where
    return (address.host, address.port)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything a node needs to start; build it with :meth:`resolve`."""

    name: str
    cookie: Cookie = field(repr=False)
    loader: LoaderAddress | None = None
    listen: tuple[str, int] = (DEFAULT_HOST, DEFAULT_PORT)
    data: str = ""
    store: str = ""  # a loader's PostgreSQL store (postgresql://...), else SQLite in data
    timeout: float = DEFAULT_TIMEOUT
    max_frame: int = DEFAULT_MAX_FRAME
    dead_after: float = DEAD_AFTER
    eager_limit: int = EAGER_LIMIT
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""

    @property
    def is_loader(self) -> bool:
        return self.loader is None

    @property
    def database(self) -> str:
        """The SQLite file of a loader, or ':memory:'."""
        if self.data == MEMORY:
            return MEMORY
        base = Path(self.data) if self.data else clustorage_home() / "data"
        return str(base / f"{self.name}.sqlite3")

    @classmethod
    def resolve(
        cls,
        *,
        name: str | None = None,
        loader: str | LoaderAddress | None = None,
        cookie: str | bytes | Cookie | None = None,
        cookie_file: str | os.PathLike[str] | None = None,
        listen: str | tuple[str, int] | None = None,
        data: str | os.PathLike[str] | None = None,
        timeout: float | None = None,
        max_frame: int | None = None,
        dead_after: float | None = None,
        eager_limit: int | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        store: str | None = None,
    ) -> NodeConfig:
        """Combine arguments with ``CLUSTORAGE_*`` environment variables and defaults.

        Raises:
            ConfigError: a name, address, timeout or cookie is not usable.
        """
        env = os.environ if env is None else env
        name = name or env.get("CLUSTORAGE_NAME") or generated_name()
        check_name(name)
        loader = loader or env.get("CLUSTORAGE_LOADER") or None
        address = parse_loader(loader) if isinstance(loader, str) else loader
        listen = listen or env.get("CLUSTORAGE_LISTEN") or None
        where = parse_listen(listen) if isinstance(listen, str) else listen
        if address is not None and address.name == name:
            # Naming yourself as the loader means "I am the loader", listening where that
            # address says unless --listen says where (SPEC "Addresses and cookie").
            where = _own_address(address, loader, where)
            address = None
        where = where or (DEFAULT_HOST, DEFAULT_PORT)
        data_text = os.fspath(data) if data is not None else env.get("CLUSTORAGE_DATA", "")
        store = store or env.get("CLUSTORAGE_STORE") or ""
        if store and not store.startswith(("postgresql://", "postgres://")):
            raise ConfigError(
                f"invalid store {store!r}: use a PostgreSQL URL, postgresql://USER@HOST/DB "
                f"(leave --store out to keep the store in SQLite under --data)"
            )
        if timeout is None:
            timeout = _number(env.get("CLUSTORAGE_TIMEOUT"), DEFAULT_TIMEOUT, "timeout")
        if not timeout > 0:
            raise ConfigError(f"invalid timeout {timeout!r}: use a number of seconds above 0")
        if max_frame is None:
            max_frame = int(
                _number(env.get("CLUSTORAGE_MAX_FRAME"), DEFAULT_MAX_FRAME, "frame limit")
            )
        if max_frame < 65536:
            raise ConfigError(f"invalid frame limit {max_frame}: use at least 65536 bytes")
        if dead_after is None:
            dead_after = _number(env.get("CLUSTORAGE_DEAD_AFTER"), DEAD_AFTER, "dead_after")
        if not dead_after >= 1:
            raise ConfigError(
                f"invalid dead_after {dead_after!r}: use a number of seconds, at least 1"
            )
        if eager_limit is None:
            eager_limit = int(
                _number(env.get("CLUSTORAGE_EAGER_LIMIT"), EAGER_LIMIT, "eager limit")
            )
        if eager_limit < 0:
            raise ConfigError(
                f"invalid eager limit {eager_limit}: use a number of bytes, 0 or more"
            )
        tls = resolve_tls(tls_cert, tls_key, tls_ca, env)
        return cls(
            name=name,
            cookie=resolve_cookie(cookie, cookie_file, env),
            loader=address,
            listen=where,
            data=data_text,
            store=store,
            timeout=timeout,
            max_frame=max_frame,
            dead_after=dead_after,
            eager_limit=eager_limit,
            tls_cert=tls[0],
            tls_key=tls[1],
            tls_ca=tls[2],
        )


def loader_command(config: NodeConfig) -> tuple[str, str | None]:
    """The command that starts ``config``'s loader with this node's cookie file and data
    directory (and, over TLS, the CA; the loader's own certificate and key are named as
    placeholders); and where this node's cookie came from, when the command cannot name it
    (not a file). With standbys listed: one more loader on their PostgreSQL store."""
    loader, cookie = config.loader, config.cookie
    assert loader is not None
    words = ["clustorage", "loader", "--name", loader.name]
    if loader.standbys:
        return f"{shlex.join(words)} --store postgresql://...", None
    words += ["--listen", _show(*loader.addresses[0])]
    if cookie.source.startswith("file "):
        words += ["--cookie-file", cookie.source.removeprefix("file ")]
    if config.data:
        words += ["--data", config.data]
    command = shlex.join(words)
    if config.tls_ca:
        command += (
            f" --tls-cert LOADER.pem --tls-key LOADER-key.pem --tls-ca {shlex.quote(config.tls_ca)}"
        )
    return command, None if cookie.source.startswith("file ") else cookie.source
