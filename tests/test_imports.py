"""Imports point down (STYLE "A layout"): checked by parsing every module with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import clustorage

PACKAGE = Path(clustorage.__file__).resolve().parent

# -- the rules, as data ----------------------------------------------------------------------

# Pure modules: no I/O machinery, and clustorage imports only among themselves.
PURE = [
    "errors",
    "config",
    "keys",
    "interrupts",  # Ctrl-C held back on the main thread (signal), no sockets
    "mapped",  # a file mapped without a descriptor (ctypes), no sockets
    "protocol",
    "fresh_memory",  # anonymous maps in the cheaper page size (mmap, ctypes), no sockets
    "bulk",  # threads and mapped memory for the protocol, no sockets
    "bigbytes",  # a big bytes value made in huge pages (ctypes), no sockets
    "messages",
    "codec",
    "compiler",
    "replica",
    "channel",
    "hello",
    "leases",
    "fanout",
    "poll_windows",  # when a waiting thread polls: times in, decisions out
]
IO_MODULES = ["asyncio", "socket", "sqlite3", "select", "selectors"]

# The one module allowed to import sqlite3.
SQLITE_ONLY = "store"
# The modules allowed to import psycopg (the optional PostgreSQL store).
PSYCOPG_ONLY = {"pgstore", "leadership"}

# Front-ends: only the public API (clustorage, its errors, config) and each other.
FRONT_ENDS = [
    "magics",
    "namespace",
    "shell",
    "shell_ui",
    "shell_complete",
    "shell_wait",
    "shell_tracebacks",
    "kernel",
    "cli",
    "flags",
    "__main__",
]
FRONT_END_MAY_IMPORT = {
    "clustorage",
    "clustorage.errors",
    "clustorage.config",  # generated_name, for front-ends that name a node
    *(f"clustorage.{name}" for name in FRONT_ENDS),
}

# Everything else: the asyncio layer, the sync facade, the store, the package itself.
MIDDLE = [
    "server",
    "loader",
    "member",
    "readers",
    "probe",
    "listener",
    "aioloop",
    "stay_awake",
    "runtime",
    "node",
    "store",
    "liveness",
    "writer",
    "writes",
    "blobs",
    "lock",
    "reserve",
    "lease_file",
    "pgstore",
    "leadership",
    "standby",
    "tls",
    "tls_init",
    "tls_stream",
    "__init__",
]


# -- reading imports -------------------------------------------------------------------------


def module_names() -> list[str]:
    """Every module of the package, by short name (``magics`` for a subpackage)."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    modules |= {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    return sorted(modules)


def source_of(name: str) -> Path:
    """The file of module ``name`` (a subpackage's ``__init__.py``)."""
    package = PACKAGE / name / "__init__.py"
    return package if package.exists() else PACKAGE / f"{name}.py"


def sources_of(name: str) -> list[tuple[str, Path]]:
    """``(package, file)`` for each file of module ``name``: one, or a subpackage's all."""
    if source_of(name).name == "__init__.py":
        return [(f"clustorage.{name}", path) for path in sorted((PACKAGE / name).glob("*.py"))]
    return [("clustorage", source_of(name))]


def resolve(
    module: str | None, level: int, names: list[str], package: str = "clustorage"
) -> list[str]:
    """The full module names one import statement of a module of ``package`` reaches."""
    if level == 0:
        base = module or ""
    else:
        parent = package.rsplit(".", level - 1)[0] if level > 1 else package
        base = parent + (f".{module}" if module else "")
    if base != "clustorage":
        return [base]
    reached = []
    for name in names:
        submodule = f"clustorage.{name}"
        reached.append(submodule if source_of(name).exists() else "clustorage")
    return reached


def imports_of(name: str) -> set[str]:
    """Every module ``name`` imports, anywhere in its body (lazy imports included).

    A subpackage's imports of its own modules are its business and are left out.
    """
    found: set[str] = set()
    for package, path in sources_of(name):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                names = [a.name for a in node.names]
                found.update(resolve(node.module, node.level, names, package))
    return {
        module
        for module in found
        if not (module == f"clustorage.{name}" or module.startswith(f"clustorage.{name}."))
    }


def present(names: list[str]) -> list[str]:
    """The listed modules that exist (a listed front-end may not have been written yet)."""
    return [name for name in names if source_of(name).exists()]


def top_level(module: str) -> str:
    """``asyncio`` for ``asyncio.subprocess``."""
    return module.split(".")[0]


# -- the checks ------------------------------------------------------------------------------


def test_every_module_is_classified() -> None:
    """Each module in clustorage/ is in exactly one layer above; each listed one exists."""
    layers = PURE + FRONT_ENDS + MIDDLE
    assert len(layers) == len(set(layers))
    present = set(module_names())
    assert present - set(layers) == set(), "classify new modules in tests/test_imports.py"
    optional = {"namespace"}
    assert set(layers) - present - optional == set()


def test_resolve_relative_imports() -> None:
    """The import reader maps relative imports to full module names."""
    assert resolve(None, 1, ["codec", "Node"]) == ["clustorage.codec", "clustorage"]
    assert resolve("errors", 1, ["ConfigError"]) == ["clustorage.errors"]
    assert resolve("os.path", 0, ["join"]) == ["os.path"]
    assert resolve("clustorage", 0, ["errors"]) == ["clustorage.errors"]
    assert resolve("session", 1, ["load"], "clustorage.magics") == ["clustorage.magics.session"]
    assert resolve(None, 2, ["errors"], "clustorage.magics") == ["clustorage.errors"]


@pytest.mark.parametrize("name", present(PURE))
def test_pure_modules_do_no_io(name: str) -> None:
    """A pure module imports none of asyncio, socket, sqlite3, select or selectors."""
    used = {top_level(m) for m in imports_of(name)} & set(IO_MODULES)
    assert used == set(), f"clustorage/{name}.py imports {sorted(used)}"


@pytest.mark.parametrize("name", present(PURE))
def test_pure_modules_import_only_pure_modules(name: str) -> None:
    """A pure module's clustorage imports are pure modules too."""
    allowed = {f"clustorage.{pure}" for pure in PURE}
    ours = {m for m in imports_of(name) if top_level(m) == "clustorage"}
    assert ours - allowed == set(), f"clustorage/{name}.py imports {sorted(ours - allowed)}"


def test_only_the_store_imports_sqlite3() -> None:
    """sqlite3 appears in store.py and nowhere else in the package."""
    users = {name for name in module_names() if "sqlite3" in map(top_level, imports_of(name))}
    assert users == {SQLITE_ONLY}


def test_only_the_postgresql_store_imports_psycopg() -> None:
    """psycopg (an optional extra) is imported by the PostgreSQL store and its lock only."""
    users = {name for name in module_names() if "psycopg" in map(top_level, imports_of(name))}
    assert users == PSYCOPG_ONLY


@pytest.mark.parametrize("name", present(FRONT_ENDS))
def test_front_ends_use_only_the_public_api(name: str) -> None:
    """A front-end imports from clustorage, its errors, config and other front-ends only."""
    ours = {m for m in imports_of(name) if top_level(m) == "clustorage"}
    extra = ours - FRONT_END_MAY_IMPORT
    assert extra == set(), f"clustorage/{name}.py imports internal modules {sorted(extra)}"
