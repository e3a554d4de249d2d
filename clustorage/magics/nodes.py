# mypy: disallow-subclassing-any=False, disallow-untyped-decorators=False
# mypy: disallow-untyped-calls=False
"""``%cluster_start``, ``%cluster_stop``, ``%cluster_status``: this process's node."""

from __future__ import annotations

import argparse
import os
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

import clustorage
from clustorage import Node
from clustorage.config import NodeConfig, loader_command
from clustorage.flags import node_options

from .base import ClusterMagics
from .display import ClusterStatus
from .loader_link import UNREACHABLE, leaving_out

__all__ = ["NodeMagics", "not_reachable_yet", "start_node"]

# NodeConfig fields that %cluster_start's flags set, and the flag that sets each.
_FLAGS = {
    "name": "--name",
    "loader": "--loader",
    "cookie": "--cookie",
    "listen": "--listen",
    "data": "--data",
    "timeout": "--timeout",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
    "tls_ca": "--tls-ca",
}
_LOADERS_ONLY = ("listen", "data")  # a member neither listens nor stores: not its flags


def _flags_differing(running: Node, args: argparse.Namespace) -> list[str]:
    """The flags (or the variables they fall back to) of a ``%cluster_start`` that ask for
    another node than ``running``; none when they ask for that very node.

    No name anywhere means "any name" (a member's may have been generated), and no cookie
    anywhere means the running node's.

    Raises:
        ConfigError: the flags are not usable, as they would be for a start.
    """
    env = os.environ
    options = node_options(args)
    options["name"] = args.name or env.get("CLUSTORAGE_NAME") or running.name
    options["loader"] = args.loader
    if not (args.cookie or args.cookie_file or env.get("CLUSTORAGE_COOKIE")):
        options["cookie"] = running.config.cookie
    wanted = NodeConfig.resolve(**options)
    members = wanted.loader is not None and running.config.loader is not None
    return [
        flag
        for field, flag in _FLAGS.items()
        if getattr(wanted, field) != getattr(running.config, field)
        and not (members and field in _LOADERS_ONLY)
    ]


def start_node(**options: Any) -> Node:
    """``clustorage.start(**options)`` for a front-end that says itself (with
    :func:`not_reachable_yet`) that a member's loader is not up yet: the library's warning
    of it is left out."""
    with leaving_out(UNREACHABLE):
        return clustorage.start(**options)


def not_reachable_yet(node: Node) -> str | None:
    """What a front-end says of a running member that has not reached its loader yet: that
    it keeps trying, and how to start that loader; None for any other node."""
    loader = node.config.loader
    if loader is None or node.connected or node.stopped:
        return None
    command, cookie = loader_command(node.config)
    if cookie:
        command += f" (with the cookie of {cookie})"
    why = node.status().get("loader_error")
    because = f" ({why})" if why else ""
    return (
        f"the loader {loader} is not reachable yet{because}: {node.name} keeps trying, and "
        f"joins it as soon as it answers (until then, a value or function {node.name} lacks "
        f"raises LoaderUnavailable after {node.timeout:g} s)\n"
        f"to start that loader: {command}"
    )


@magics_class
class NodeMagics(ClusterMagics):
    """Start, stop and inspect this process's node."""

    @magic_arguments()
    @argument(
        "--name",
        "-n",
        help="this node's name (default: $CLUSTORAGE_NAME; a member's may be generated, a "
        "loader needs one)",
    )
    @argument(
        "--loader",
        "-l",
        metavar="NAME[@HOST[:PORT]]",
        help="the loader to join (default: $CLUSTORAGE_LOADER; none: this node is the loader)",
    )
    @argument("--cookie", help="the cluster's secret (default: $CLUSTORAGE_COOKIE, else file)")
    @argument("--cookie-file", metavar="FILE", help="read the secret from FILE (mode 0600)")
    @argument("--listen", metavar="HOST:PORT", help="where a loader listens (127.0.0.1:4370)")
    @argument("--data", metavar="DIR", help="a loader's data directory, or :memory:")
    @argument("--timeout", type=float, metavar="SECONDS", help="how long to wait for the loader")
    @argument(
        "--tls-cert", metavar="FILE", help="this node's TLS certificate ($CLUSTORAGE_TLS_CERT)"
    )
    @argument("--tls-key", metavar="FILE", help="its private key ($CLUSTORAGE_TLS_KEY)")
    @argument("--tls-ca", metavar="FILE", help="the cluster's CA certificate ($CLUSTORAGE_TLS_CA)")
    @line_magic
    def cluster_start(self, line: str) -> Node | None:
        """Start this kernel's node: join the loader's cluster, or be the loader.

        Without --loader (and without $CLUSTORAGE_LOADER) this node is the loader, and needs
        a --name (its store is named after it). Flags not given fall back to the
        CLUSTORAGE_* environment variables. Functions already in the cluster are bound into
        your namespace.

        A loader that is not reachable yet does not stop the node: it starts, says so with
        the command that starts that loader, and keeps trying to reach it. Until it does, a
        value or function it does not have yet waits --timeout seconds, then raises
        LoaderUnavailable.

        Running it again with the same flags while its node runs (as "Run All" does) only
        says so; other flags are an error: %cluster_stop first.

        In [1]: %cluster_start --name app2 --loader app1@127.0.0.1:4370
        Out[1]: <clustorage.Node app2 (member of app1@127.0.0.1:4370, connected)>
        """
        args = parse_argstring(self.cluster_start, line)
        running = clustorage.default_node()
        if running is not None:
            self._already_running(running, args)
            return None
        name = args.name or os.environ.get("CLUSTORAGE_NAME")
        if not name and not (args.loader or os.environ.get("CLUSTORAGE_LOADER")):
            # A loader's name picks its store file: a generated one would make a new,
            # empty store at every start.
            raise UsageError(
                "a loader needs a name, which also names its store: %cluster_start --name "
                "NAME (or join a loader with --loader NAME[@HOST[:PORT]])"
            )
        node = start_node(name=args.name, loader=args.loader, **node_options(args))
        if notice := not_reachable_yet(node):
            print(notice)
        self.session.follow(node)
        self.session.sync.apply()
        return node

    def _already_running(self, running: Node, args: argparse.Namespace) -> None:
        """Say that ``running`` is the node ``args`` ask for, or raise UsageError: it is not."""
        what = f"{running.role} of {running.loader_address}"
        differing = _flags_differing(running, args)
        if differing:
            verb = "differs" if len(differing) == 1 else "differ"
            raise UsageError(
                f"this process already runs node {running.name!r} ({what}), and "
                f"{', '.join(differing)} {verb} from it; to switch, run %cluster_stop first, "
                f"then %cluster_start again"
            )
        state = "connected" if running.connected else "not connected"
        print(f"node {running.name} is already running ({what}, {state})")

    @magic_arguments()
    @line_magic
    def cluster_stop(self, line: str) -> None:
        """Stop this kernel's node (a loader stops serving). Bound functions stay usable.

        In [1]: %cluster_stop
        stopped node app2
        """
        parse_argstring(self.cluster_stop, line)
        node = clustorage.default_node()
        if node is None:
            print("no clustorage node runs here")
            return
        self.session.follow(None)
        clustorage.stop()
        print(f"stopped node {node.name}")

    @magic_arguments()
    @line_magic
    def cluster_status(self, line: str) -> ClusterStatus:
        """The loader, every connected node (role, address, connected for), keys and functions.

        An HTML table in notebooks, a text table in terminals.

        In [1]: %cluster_status
        Out[1]:
        app2 is a member of app1@127.0.0.1:4370 (connected); 2 keys, 1 function
          node               role    address          connected for
          app1               loader  local            5m 02s
          app2 (this node)   member  127.0.0.1:51506  12s
        """
        parse_argstring(self.cluster_status, line)
        return ClusterStatus(self.session.node().status())
