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
    "protocol",
    "messages",
    "codec",
    "compiler",
    "replica",
    "channel",
    "hello",
    "leases",
]
IO_MODULES = ["asyncio", "socket", "sqlite3", "select", "selectors"]

# The one module allowed to import sqlite3.
SQLITE_ONLY = "store"

# Front-ends: only the public API (clustorage, its errors, config) and each other.
FRONT_ENDS = [
    "magics",
    "namespace",
    "shell",
    "shell_ui",
    "shell_complete",
    "kernel",
    "cli",
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
    "reactor",
    "runtime",
    "node",
    "store",
    "liveness",
    "writer",
    "blobs",
    "__init__",
]


# -- reading imports -------------------------------------------------------------------------


def module_names() -> list[str]:
    """Every module of the package, by short name."""
    return sorted(path.stem for path in PACKAGE.glob("*.py"))


def source_of(name: str) -> Path:
    """The file of module ``name``."""
    return PACKAGE / f"{name}.py"


def resolve(module: str | None, level: int, names: list[str]) -> list[str]:
    """The full module names one import statement of a clustorage module reaches."""
    # Every module lives directly in the package, so '.' is clustorage itself.
    base = (module or "") if level == 0 else "clustorage" + (f".{module}" if module else "")
    if base != "clustorage":
        return [base]
    reached = []
    for name in names:
        submodule = f"clustorage.{name}"
        reached.append(submodule if source_of(name).exists() else "clustorage")
    return reached


def imports_of(name: str) -> set[str]:
    """Every module ``name`` imports, anywhere in its body (lazy imports included)."""
    tree = ast.parse(source_of(name).read_text(), filename=str(source_of(name)))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.update(resolve(node.module, node.level, [a.name for a in node.names]))
    return found


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


@pytest.mark.parametrize("name", present(FRONT_ENDS))
def test_front_ends_use_only_the_public_api(name: str) -> None:
    """A front-end imports from clustorage, its errors, config and other front-ends only."""
    ours = {m for m in imports_of(name) if top_level(m) == "clustorage"}
    extra = ours - FRONT_END_MAY_IMPORT
    assert extra == set(), f"clustorage/{name}.py imports internal modules {sorted(extra)}"
