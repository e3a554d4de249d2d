"""``clustorage``: run a headless loader, or ask a cluster for its state."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from . import ClustorageError, ConfigError, LoaderUnavailable, Node, Probe, init_tls
from .config import LoaderAddress, parse_loader
from .flags import add_node_flags, check_listen, member_hint, name_from, node_options

__all__ = ["main"]

NO_LOADER = (
    "name the loader to ask with --loader NAME[@HOST[:PORT]] (or $CLUSTORAGE_LOADER), "
    "e.g. --loader app1 for a loader on 127.0.0.1:4370, or --loader app1@127.0.0.1:43700 "
    "with --cookie-file ~/.clustorage/demo/cookie for the demo"
)
NO_NAME = (
    "name the loader with --name NAME (or $CLUSTORAGE_NAME): its store is "
    "DIR/NAME.sqlite3, so the same name opens the same store at every restart"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clustorage",
        description="A cluster where a value is computed once for everyone and a function "
        "defined once is hot-loaded into every node.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    loader = commands.add_parser("loader", help="run a headless loader in the foreground")
    add_node_flags(
        loader,
        name="the loader's name, required (default: $CLUSTORAGE_NAME); its store is "
        "DIR/NAME.sqlite3",
        listen=True,
        data=True,
        store=True,
    )

    for name, text in (
        ("status", "print the cluster's state"),
        ("history", "print every version of a function or value"),
    ):
        sub = commands.add_parser(name, help=text)
        add_node_flags(sub, loader="the loader to ask, required (default: $CLUSTORAGE_LOADER)")
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        if name == "history":
            sub.add_argument("key", help="the function name (or value key with --value)")
            sub.add_argument("--value", action="store_true", help="KEY names a value")

    tls = commands.add_parser("tls", help="TLS key material for a cluster without a PKI")
    actions = tls.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = actions.add_parser(
        "init",
        help="make a private CA and node certificates in DIR (needs: pip install clustorage[tls])",
    )
    init.add_argument("dir", metavar="DIR", help="the folder to write them to (made 0700)")
    init.add_argument(
        "--node",
        action="append",
        metavar="NAME",
        help="a node to make a certificate for (repeat; default: node); writes NAME.pem and "
        "NAME-key.pem",
    )
    init.add_argument(
        "--host",
        action="append",
        metavar="H",
        help="a host name or address the loader is reached at (repeat); 127.0.0.1 and "
        "localhost are always in",
    )
    return parser


def _run_loader(args: argparse.Namespace) -> int:
    name = name_from(args)
    if name is None:
        raise ConfigError(NO_NAME)
    check_listen(args.listen, name)  # before the store is created
    done = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        done.set()

    # Before the loader listens: a signal from then on stops it cleanly.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    node = Node(name, None, store=args.store, **node_options(args))
    host, port = node.address
    hint = member_hint(node.name, host, port)
    if node.config.store:  # one of several: members list them all
        hint += ",HOST:PORT of each standby; it serves once it holds the store's lock"
    logging.getLogger("clustorage").info(
        "loader %s ready on %s:%d (members: %s)", node.name, host, port, hint
    )
    while not done.wait(3600):
        pass
    node.stop()
    logging.getLogger("clustorage").info("loader %s stopped", node.name)
    return 0


def _probe(where: LoaderAddress, args: argparse.Namespace) -> Probe:
    """A one-shot connection to the loader at ``where``: it does not join, so nothing is
    downloaded."""
    return Probe(
        where,
        cookie=args.cookie,
        cookie_file=args.cookie_file,
        timeout=args.timeout,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
    )


def _since(epoch: float) -> str:
    seconds = int(time.time() - epoch)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def _print_status(status: dict[str, Any]) -> None:
    cluster = status["cluster"]
    print(f"loader    {status['loader']}  (store: {cluster.get('store', '?')})")
    print(f"keys      {status['keys']}")
    print(f"functions {status['functions']}")
    if len(status["loaders"]) > 1:
        for row in status["loaders"]:
            print(f"  {row['address']:<24} {row['role']}")
    print(f"nodes     {len(status['nodes'])}")
    for node in status["nodes"]:
        print(
            f"  {node['name']:<24} {node['role']:<7} {node['address']:<22} "
            f"up {_since(node['connected_since'])}"
        )


def _loaders(
    args: argparse.Namespace,
) -> tuple[dict[str, Any] | None, str, list[dict[str, Any]]]:
    """The active loader's status and address, and each listed loader's role (a probe to
    each)."""
    listed = parse_loader(args.loader or os.environ.get("CLUSTORAGE_LOADER", ""))
    cluster: dict[str, Any] | None = None
    active = ""
    loaders: list[dict[str, Any]] = []
    for host, port in listed.addresses:
        where = LoaderAddress(listed.name, host, port)
        row: dict[str, Any] = {"address": str(where).partition("@")[2]}
        try:
            with _probe(where, args) as probe:
                answer = probe.status()
        except LoaderUnavailable as exc:
            row.update(role="unreachable", error=str(exc))
        else:
            row["role"] = answer.get("role", "active")
            if row["role"] == "standby":
                row["active"] = answer.get("active", "")
            elif cluster is None:
                cluster, active = answer, str(where)
        loaders.append(row)
    return cluster, active, loaders


def _run_status(args: argparse.Namespace) -> int:
    if not (args.loader or os.environ.get("CLUSTORAGE_LOADER")):
        raise ConfigError(NO_LOADER)
    cluster, active, loaders = _loaders(args)
    if cluster is None:
        if len(loaders) == 1:
            raise LoaderUnavailable(loaders[0].get("error", "the loader stands by"))
        reasons = "; ".join(f"{row['address']}: {row.get('error', row['role'])}" for row in loaders)
        raise LoaderUnavailable(f"no active loader answers ({reasons})")
    status = {
        "loader": active,
        "connected": True,
        "keys": cluster["keys"],
        "functions": cluster["functions"],
        "nodes": cluster["nodes"],
        "cluster": cluster,
        "loaders": loaders,
    }
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        _print_status(status)
    return 0


def _history(args: argparse.Namespace) -> list[Any]:
    """The key's history from the first listed loader that is active."""
    if not (args.loader or os.environ.get("CLUSTORAGE_LOADER")):
        raise ConfigError(NO_LOADER)
    listed = parse_loader(args.loader or os.environ.get("CLUSTORAGE_LOADER", ""))
    failures: list[LoaderUnavailable] = []
    for host, port in listed.addresses:
        where = listed if not listed.standbys else LoaderAddress(listed.name, host, port)
        try:
            with _probe(where, args) as probe:
                return list(probe.history(args.key, "value" if args.value else "function"))
        except LoaderUnavailable as exc:  # down, or a standby: the next one
            failures.append(exc)
    if len(failures) == 1:
        raise failures[0]
    raise LoaderUnavailable("no active loader answers: " + "; ".join(map(str, failures)))


def _run_history(args: argparse.Namespace) -> int:
    entries = _history(args)
    rows: list[dict[str, Any]] = [
        {
            "version": entry.version,
            "origin": entry.origin,
            "time": entry.time,
            "deleted": entry.source is None and not entry.payload and entry.kind == "function",
            "source": entry.source,
        }
        for entry in entries
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no history for {args.key!r}")
        return 1
    for row in rows:
        when = datetime.fromtimestamp(row["time"]).isoformat(" ", "seconds")
        print(f"v{row['version']}  {when}  by {row['origin']}" + ("  (deleted)" * row["deleted"]))
        if row["source"]:
            print("    " + row["source"].rstrip().replace("\n", "\n    "))
    return 0


def _run_tls(args: argparse.Namespace) -> int:
    made = init_tls(args.dir, args.node or ["node"], args.host or [])
    for path in made:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``clustorage`` command."""
    args = _parser().parse_args(argv)
    quiet = args.command != "loader"  # the others print results, not a log
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    run = {
        "loader": _run_loader,
        "status": _run_status,
        "history": _run_history,
        "tls": _run_tls,
    }[args.command]
    try:
        return run(args)
    except ConfigError as exc:
        print(f"clustorage {args.command}: {exc}", file=sys.stderr)
        return 2
    except LoaderUnavailable as exc:
        print(f"clustorage {args.command}: {exc}", file=sys.stderr)
        return 1
    except ClustorageError as exc:
        print(f"clustorage {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
