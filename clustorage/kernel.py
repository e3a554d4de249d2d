"""The Clustorage Jupyter kernel: ipykernel with ``%load_ext clustorage`` (SPEC "IPython/Jupyter").

``python -m clustorage.kernel -f CONNECTION_FILE`` starts the kernel. With
``CLUSTORAGE_LOADER`` set it joins that cluster as a member (named by ``CLUSTORAGE_NAME``, else a
generated name); with only ``CLUSTORAGE_NAME`` it is the loader; with neither it is a plain
Python kernel until ``%cluster_start``.

``clustorage-kernel install [--user | --sys-prefix | --prefix P] [--name K] [--display-name D]
[--node-name N] [--loader L]`` installs the kernelspec the way ``python -m ipykernel install``
does: pure data first (:func:`get_kernel_dict`), then files (:func:`write_kernel_spec`), then
installation through jupyter_client (:func:`install`). The cookie never goes into a kernelspec.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import clustorage

__all__ = [
    "DISPLAY_NAME",
    "KERNEL_NAME",
    "RESOURCES",
    "get_kernel_dict",
    "install",
    "launch",
    "load_ipython_extension",
    "main",
    "write_kernel_spec",
]

KERNEL_NAME = "clustorage"
DISPLAY_NAME = "Clustorage (Python 3)"
RESOURCES = Path(__file__).with_name("kernelspec")  # kernel.json template and logos
_NODE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _check_node_name(name: str, what: str) -> str:
    if not _NODE_NAME.fullmatch(name):
        raise ValueError(f"invalid {what} {name!r}: use 1 to 64 of A-Z, a-z, 0-9, '_' and '-'")
    return name


def _ipykernel_metadata() -> dict[str, Any]:
    try:
        from ipykernel.kernelspec import get_kernel_dict as ipykernel_dict

        return dict(ipykernel_dict().get("metadata", {}))
    except Exception:  # an ipykernel without it: the template's metadata is enough
        return {}


def get_kernel_dict(
    *,
    executable: str | None = None,
    display_name: str | None = None,
    node_name: str | None = None,
    loader: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
) -> dict[str, Any]:
    """The kernel.json contents: the template with this Python and the cluster settings.

    Args:
        executable: the Python that runs the kernel (default: this one).
        display_name: the name shown in launchers (default "Clustorage (Python 3)").
        node_name: ``CLUSTORAGE_NAME`` for the kernel (alone: the kernel is the loader).
        loader: ``CLUSTORAGE_LOADER`` for the kernel, ``NAME[@HOST[:PORT]]``, or
            ``NAME@HOST:PORT,HOST:PORT`` for a loader and its standbys.
        tls_cert, tls_key, tls_ca: ``CLUSTORAGE_TLS_CERT``/``_KEY``/``_CA``: the paths of
            the kernel's TLS files, all three or none (paths only: no key material).

    Raises:
        ValueError: a node or loader name is not valid, or only some TLS files are given.
    """
    spec: dict[str, Any] = json.loads((RESOURCES / "kernel.json").read_text())
    spec["argv"][0] = executable or sys.executable
    # What the installed ipykernel supports (the template stays safe for any ipykernel).
    spec["metadata"] = {**_ipykernel_metadata(), **spec["metadata"]}
    if display_name:
        spec["display_name"] = display_name
    env = {}
    if node_name:
        env["CLUSTORAGE_NAME"] = _check_node_name(node_name, "node name")
    if loader:
        _check_node_name(loader.partition("@")[0], "loader name")
        env["CLUSTORAGE_LOADER"] = loader
    env.update(_tls_env(tls_cert, tls_key, tls_ca))
    if env:
        spec["env"] = env
    return spec


def _tls_env(cert: str | None, key: str | None, ca: str | None) -> dict[str, str]:
    given = {"CERT": cert, "KEY": key, "CA": ca}
    missing = [f"--tls-{what.lower()}" for what, path in given.items() if not path]
    if len(missing) == 3:
        return {}
    if missing:
        raise ValueError(
            f"TLS needs --tls-cert, --tls-key and --tls-ca: missing {', '.join(missing)}"
        )
    return {
        f"CLUSTORAGE_TLS_{what}": str(Path(str(path)).resolve()) for what, path in given.items()
    }


def write_kernel_spec(path: str | Path | None = None, **kernel: Any) -> Path:
    """Write a kernelspec directory (kernel.json and logos) to ``path``, or a temporary one.

    Keyword arguments go to :func:`get_kernel_dict`. Returns the directory.
    """
    target = Path(tempfile.mkdtemp(suffix="_kernels")) / KERNEL_NAME if path is None else Path(path)
    spec = get_kernel_dict(**kernel)
    target.mkdir(parents=True, exist_ok=True)
    for logo in sorted(RESOURCES.glob("logo-*.png")):
        shutil.copyfile(logo, target / logo.name)
    (target / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
    return target


def install(
    *,
    user: bool = False,
    prefix: str | None = None,
    kernel_name: str = KERNEL_NAME,
    display_name: str | None = None,
    node_name: str | None = None,
    loader: str | None = None,
    kernel_spec_manager: Any = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
) -> str:
    """Install the kernelspec through jupyter_client; returns where it went.

    Args:
        user: install for this user only.
        prefix: install into ``PREFIX/share/jupyter/kernels`` (e.g. ``sys.prefix``).
        kernel_name: the kernelspec's name (default ``clustorage``).
        display_name, node_name, loader, tls_cert, tls_key, tls_ca: see
            :func:`get_kernel_dict`.
        kernel_spec_manager: a ``KernelSpecManager`` (default: a new one).

    Raises:
        ValueError: an invalid name, or both ``user`` and ``prefix``.
        OSError: the target directory is not writable (try ``user=True``).
    """
    from jupyter_client.kernelspec import KernelSpecManager

    manager = kernel_spec_manager or KernelSpecManager()
    if kernel_name != KERNEL_NAME and display_name is None:
        display_name = f"{DISPLAY_NAME} [{kernel_name}]"
    staging = write_kernel_spec(
        display_name=display_name,
        node_name=node_name,
        loader=loader,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
    )
    try:
        return str(
            manager.install_kernel_spec(
                str(staging), kernel_name=kernel_name, user=user, prefix=prefix
            )
        )
    finally:
        shutil.rmtree(staging.parent, ignore_errors=True)


def load_ipython_extension(ipython: Any) -> None:
    """The kernel's extension: ``%load_ext clustorage``, and ``get``, ``call`` and ``node``
    of the running node in the namespace, as in the shell (unless the user takes them)."""
    from .magics import load_ipython_extension as load_magics
    from .magics import session_for

    load_magics(ipython, at_startup=True)
    session = session_for(ipython)
    if session is not None:
        session.bind_api = True
        session.follow(clustorage.default_node())


def launch(argv: Sequence[str] | None = None) -> None:
    """Start ipykernel with the clustorage extension loaded (``python -m clustorage.kernel``)."""
    from ipykernel.kernelapp import IPKernelApp

    args = list(sys.argv[1:] if argv is None else argv)
    IPKernelApp.launch_instance(argv=["--ext=clustorage.kernel", *args])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clustorage-kernel",
        description="The Clustorage Jupyter kernel: IPython with the %cluster_* magics, "
        "joined to a cluster.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub = commands.add_parser(
        "install",
        help="install the kernelspec",
        description="Install the 'Clustorage (Python 3)' kernelspec, as 'python -m ipykernel "
        "install' does. Without --node-name/--loader the kernel starts no node until "
        "%cluster_start; with --loader it joins that cluster; with only --node-name it is the "
        "loader. The cookie is never written: kernels find it in $CLUSTORAGE_COOKIE or "
        "~/.clustorage/cookie.",
    )
    where = sub.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user only")
    where.add_argument(
        "--sys-prefix",
        action="store_true",
        help=f"install into this Python's prefix ({sys.prefix})",
    )
    where.add_argument("--prefix", metavar="P", help="install into P/share/jupyter/kernels")
    sub.add_argument("--name", default=KERNEL_NAME, help=f"kernelspec name ({KERNEL_NAME})")
    sub.add_argument("--display-name", metavar="D", help=f"name in launchers ({DISPLAY_NAME})")
    sub.add_argument("--node-name", metavar="N", help="CLUSTORAGE_NAME for the kernel")
    sub.add_argument(
        "--loader",
        metavar="NAME[@HOST[:PORT][,HOST[:PORT]...]]",
        help="CLUSTORAGE_LOADER for the kernel",
    )
    for what in ("cert", "key", "ca"):
        sub.add_argument(
            f"--tls-{what}",
            metavar="FILE",
            help=f"CLUSTORAGE_TLS_{what.upper()} for the kernel (its path only is written)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``clustorage-kernel``: install the kernelspec; returns the exit status."""
    args = _parser().parse_args(argv)
    prefix = sys.prefix if args.sys_prefix else args.prefix
    try:
        dest = install(
            user=args.user,
            prefix=prefix,
            kernel_name=args.name,
            display_name=args.display_name,
            node_name=args.node_name,
            loader=args.loader,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_ca=args.tls_ca,
        )
    except ValueError as exc:
        print(f"clustorage-kernel: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        hint = "" if args.user or prefix else "; use --user to install for yourself"
        print(
            f"clustorage-kernel: cannot install into {exc.filename or '?'}: {exc.strerror}{hint}",
            file=sys.stderr,
        )
        return 1
    print(f"Installed kernelspec {args.name} in {dest}")
    return 0


if __name__ == "__main__":
    # Like ipykernel_launcher: keep the working directory off sys.path while ipykernel loads
    # (InteractiveShellApp puts it back for the user's code).
    if sys.path and (sys.path[0] == "" or Path(sys.path[0]) == Path.cwd()):
        del sys.path[0]
    launch()
