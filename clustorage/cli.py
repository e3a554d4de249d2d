"""``clustorage``: run a headless loader, or ask a cluster for its state."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from . import ClustorageError, Node
from .config import generated_name

__all__ = ["main"]


def _cookie_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--cookie",
        help="the cluster secret (default: $CLUSTORAGE_COOKIE, else ~/.clustorage/cookie)",
    )
    group.add_argument("--cookie-file", metavar="F", help="read the cluster secret from F")
    parser.add_argument("--timeout", type=float, help="seconds to wait for the loader (default 5)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clustorage",
        description="A cluster where a value is computed once for everyone and a function "
        "defined once is hot-loaded into every node.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    loader = commands.add_parser("loader", help="run a headless loader in the foreground")
    loader.add_argument("--name", help="the loader's node name (default: $CLUSTORAGE_NAME)")
    loader.add_argument("--listen", metavar="HOST:PORT", help="default 127.0.0.1:4370")
    loader.add_argument("--data", metavar="DIR", help="where the SQLite store lives, or :memory:")
    _cookie_options(loader)

    for name, text in (
        ("status", "print the cluster's state"),
        ("history", "print every version of a function or value"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument(
            "--loader", metavar="NAME[@HOST[:PORT]]", help="default $CLUSTORAGE_LOADER"
        )
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        _cookie_options(sub)
        if name == "history":
            sub.add_argument("key", help="the function name (or value key with --value)")
            sub.add_argument("--value", action="store_true", help="KEY names a value")
    return parser


def _run_loader(args: argparse.Namespace) -> int:
    node = Node(
        args.name,
        None,
        cookie=args.cookie,
        cookie_file=args.cookie_file,
        listen=args.listen,
        data=args.data,
        timeout=args.timeout,
    )
    host, port = node.address
    logging.getLogger("clustorage").info(
        "loader %s ready on %s:%d (members: --loader %s)",
        node.name,
        host,
        port,
        node.loader_address,
    )
    done = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not done.wait(3600):
        pass
    node.stop()
    logging.getLogger("clustorage").info("loader %s stopped", node.name)
    return 0


def _member(args: argparse.Namespace) -> Node:
    node = Node(
        f"cli-{generated_name()}"[:64],
        args.loader,
        cookie=args.cookie,
        cookie_file=args.cookie_file,
        timeout=args.timeout,
    )
    if not node.connected:
        node.stop()
        raise SystemExit(f"clustorage: cannot reach the loader {node.loader_address}")
    return node


def _since(epoch: float) -> str:
    seconds = int(time.time() - epoch)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def _print_status(status: dict[str, Any]) -> None:
    cluster = status.get("cluster", {})
    print(f"loader    {status['loader']}  (store: {cluster.get('store', '?')})")
    print(f"keys      {cluster.get('keys', status['keys'])}")
    print(f"functions {cluster.get('functions', status['functions'])}")
    print(f"nodes     {len(status['nodes'])}")
    for node in status["nodes"]:
        if node["name"] == status["name"]:
            continue
        print(
            f"  {node['name']:<24} {node['role']:<7} {node['address']:<22} "
            f"up {_since(node['connected_since'])}"
        )


def _run_status(args: argparse.Namespace) -> int:
    node = _member(args)
    try:
        status = node.status()
    finally:
        node.stop()
    status["nodes"] = [n for n in status["nodes"] if n["name"] != node.name]
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        _print_status(status)
    return 0


def _run_history(args: argparse.Namespace) -> int:
    node = _member(args)
    try:
        entries = node.history(args.key, "value" if args.value else "function")
    finally:
        node.stop()
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``clustorage`` command."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    run = {"loader": _run_loader, "status": _run_status, "history": _run_history}[args.command]
    try:
        return run(args)
    except ClustorageError as exc:
        print(f"clustorage {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
