"""The node flags the ``clustorage`` and ``clustorage-shell`` command lines share, and the
checks they make on them before a node starts (SPEC "Addresses and cookie", "Terminal")."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import socket
from collections.abc import Mapping
from typing import Any

from .config import DEFAULT_HOST, DEFAULT_PORT, parse_listen
from .errors import ConfigError

__all__ = [
    "add_node_flags",
    "check_listen",
    "is_loader",
    "member_hint",
    "name_from",
    "node_options",
]

# The keyword arguments of clustorage.start and Node that the node flags give, by name.
_NODE_OPTIONS = (
    "cookie",
    "cookie_file",
    "listen",
    "data",
    "timeout",
    "tls_cert",
    "tls_key",
    "tls_ca",
)

_HELP = {
    "name": "this node's name (default: $CLUSTORAGE_NAME)",
    "loader": "the loader, NAME[@HOST[:PORT]] (default: $CLUSTORAGE_LOADER)",
    "listen": f"where a loader listens (default: $CLUSTORAGE_LISTEN, else "
    f"{DEFAULT_HOST}:{DEFAULT_PORT})",
    "data": "a loader's SQLite directory, or :memory: for none (default: $CLUSTORAGE_DATA, "
    "else ~/.clustorage/data)",
    "store": "keep the loader's store in PostgreSQL, shared with its standbys "
    "(default: $CLUSTORAGE_STORE, else SQLite under --data)",
}
_METAVAR = {
    "name": "NAME",
    "loader": "NAME[@HOST[:PORT][,HOST[:PORT]...]]",
    "listen": "HOST:PORT",
    "data": "DIR",
    "store": "postgresql://...",
}


def add_node_flags(parser: argparse.ArgumentParser, **flags: str | bool) -> None:
    """Add the cookie flags, ``--timeout`` and each node flag named in ``flags``.

    Args:
        parser: the command's parser.
        flags: ``name``, ``loader``, ``listen``, ``data``, ``store``: True for the usual
            help text, or the help text this command needs.
    """
    for flag, wanted in flags.items():
        if flag not in _HELP:
            raise TypeError(f"unknown node flag {flag!r}; use some of {sorted(_HELP)}")
        if wanted:
            help_text = wanted if isinstance(wanted, str) else _HELP[flag]
            parser.add_argument(f"--{flag}", metavar=_METAVAR[flag], help=help_text)
    cookie = parser.add_mutually_exclusive_group()
    cookie.add_argument(
        "--cookie",
        help="the cluster secret (default: $CLUSTORAGE_COOKIE, else ~/.clustorage/cookie)",
    )
    cookie.add_argument("--cookie-file", metavar="F", help="read the cluster secret from F")
    parser.add_argument(
        "--timeout", type=float, metavar="S", help="seconds to wait for the loader (default 5)"
    )
    for what, text in _TLS_HELP.items():
        parser.add_argument(f"--tls-{what}", metavar="FILE", help=text)


_TLS_HELP = {
    "cert": "this node's TLS certificate, PEM (default: $CLUSTORAGE_TLS_CERT); with --tls-key "
    "and --tls-ca the node speaks TLS 1.3 only ('clustorage tls init' makes all three)",
    "key": "the private key of --tls-cert, PEM (default: $CLUSTORAGE_TLS_KEY)",
    "ca": "the cluster's CA certificate, PEM (default: $CLUSTORAGE_TLS_CA)",
}


def node_options(args: argparse.Namespace) -> dict[str, Any]:
    """What the node flags in ``args`` (a namespace from add_node_flags, or a magic's)
    say for clustorage.start or Node, as keyword arguments."""
    return {option: getattr(args, option) for option in _NODE_OPTIONS}


def is_loader(name: str | None, loader: str | None, env: Mapping[str, str] | None = None) -> bool:
    """Whether a node with these flags is the loader: no loader named, or itself named."""
    env = os.environ if env is None else env
    name = name or env.get("CLUSTORAGE_NAME")
    text = loader or env.get("CLUSTORAGE_LOADER")
    return not text or text.partition("@")[0] == name


def name_from(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> str | None:
    """The node name from ``--name`` or ``$CLUSTORAGE_NAME``, if either is set."""
    env = os.environ if env is None else env
    return getattr(args, "name", None) or env.get("CLUSTORAGE_NAME") or None


def _listen_text(
    listen: str | None, name: str | None, loader: str | None, env: Mapping[str, str]
) -> tuple[str, str]:
    """The address a loader will listen on, and the flag (or variable) that set it."""
    if listen:
        return listen, "--listen"
    if env.get("CLUSTORAGE_LISTEN"):
        return env["CLUSTORAGE_LISTEN"], "$CLUSTORAGE_LISTEN"
    flag = "--loader" if loader else "$CLUSTORAGE_LOADER"
    loader = loader or env.get("CLUSTORAGE_LOADER")
    if loader and "@" in loader and is_loader(name, loader, env):  # it names this very node
        return loader.partition("@")[2], flag
    return f"{DEFAULT_HOST}:{DEFAULT_PORT}", "the default address"


def check_listen(
    listen: str | None,
    name: str | None = None,
    loader: str | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Check, before a loader creates anything, that it can listen where it was told.

    Args:
        listen: ``--listen``; name, loader: ``--name`` and ``--loader`` (a loader address
            naming this node says where it listens); env: the environment to read.

    Raises:
        ConfigError: naming the flag: the address does not parse, its host does not resolve
            to an address of this machine, or another process listens there.
    """
    env = os.environ if env is None else env
    text, origin = _listen_text(listen, name, loader, env)
    try:
        host, port = parse_listen(text)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}; use HOST:PORT, such as 127.0.0.1:4370") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(
            f"{origin} {text!r}: cannot resolve host {host!r} ({exc.strerror}); "
            f"use HOST:PORT, such as 127.0.0.1:4370 or 0.0.0.0:4370"
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the loader binds
        try:
            probe.bind(address)
        except OSError as exc:
            busy = " (is another loader running there?)" * (exc.errno == errno.EADDRINUSE)
            raise ConfigError(
                f"{origin}: cannot listen on {text}: {exc.strerror}{busy}; "
                f"choose another address with --listen HOST:PORT"
            ) from None


_WILDCARDS = {"", "0.0.0.0", "::", "0:0:0:0:0:0:0:0"}


def _usable_hosts(host: str) -> list[str]:
    """Where members can reach a loader bound to ``host``: the host itself, or for a wildcard
    the machine's name and its non-loopback addresses (its name alone when it has none)."""
    if host not in _WILDCARDS:
        return [host]
    hostname = socket.gethostname()
    found: list[str] = []
    with contextlib.suppress(OSError):
        found += [str(info[4][0]) for info in socket.getaddrinfo(hostname, None)]
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.connect(("192.0.2.1", 9))  # picks the outgoing interface; sends nothing
        found.append(str(udp.getsockname()[0]))
    addresses = [a for a in dict.fromkeys(found) if not a.startswith(("127.", "::1", "0.0"))]
    return [hostname, *addresses]


def member_hint(name: str, host: str, port: int) -> str:
    """How members name this loader: ``--loader NAME@HOST:PORT``, with a usable host (for a
    loader on 0.0.0.0, the machine's name, then its addresses)."""
    choices = []
    for usable in _usable_hosts(host):
        shown = f"[{usable}]" if ":" in usable else usable
        choices.append(f"--loader {name}@{shown}:{port}")
    return " or ".join(choices)
