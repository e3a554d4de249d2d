"""Every notebook in notebooks/ runs top to bottom, unattended, on the clustorage kernel."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from conftest import ROOT
from conftest_jupyter import CLUSTORAGE_VARIABLES, install_kernelspec, isolated_env, reap
from nbclient import NotebookClient

pytestmark = pytest.mark.timeout(60)

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The clustorage kernelspec installed into a temporary prefix."""
    return install_kernelspec(tmp_path_factory.mktemp("prefix"))


def test_there_are_notebooks() -> None:
    """The quickstart and at least one worked example exist, set to the clustorage kernel."""
    assert ROOT / "notebooks" / "quickstart.ipynb" in NOTEBOOKS and len(NOTEBOOKS) >= 2
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        assert notebook.metadata.kernelspec.name == "clustorage"


def isolate(home: Path, jupyter_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels started from here get a private HOME and no CLUSTORAGE_* settings."""
    home.mkdir()
    for key, value in isolated_env(home, jupyter_path).items():
        monkeypatch.setenv(key, value)
    for key in CLUSTORAGE_VARIABLES:
        monkeypatch.delenv(key, raising=False)


def client_for(notebook: nbformat.NotebookNode, folder: Path) -> NotebookClient:
    """An nbclient client running ``notebook`` on the clustorage kernel in ``folder``."""
    return NotebookClient(
        notebook,
        timeout=60,
        kernel_name="clustorage",
        resources={"metadata": {"path": str(folder)}},
    )


@pytest.mark.timeout(90)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom_and_cleans_up(
    path: Path, jupyter_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Executed by nbclient: no cell fails, and no process it started outlives it."""
    home = tmp_path / "home"
    isolate(home, jupyter_path, monkeypatch)
    notebook = nbformat.read(path, as_version=4)
    client = client_for(notebook, tmp_path)
    try:
        client.execute()
    finally:
        left = reap(home)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code)
    errors = [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert errors == []
    assert left == [], f"the notebook left processes behind: {left}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_run_all_after_the_first_cells_ran(
    path: Path, jupyter_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cells up to %cluster_start ran, then "Run All" in the same kernel: no cell fails,
    and the %cluster_start run again says in one line that its node is already running."""
    home = tmp_path / "home"
    isolate(home, jupyter_path, monkeypatch)
    notebook = nbformat.read(path, as_version=4)
    cells = list(enumerate(notebook.cells))
    start = next(i for i, cell in cells if cell.source.startswith("%cluster_start"))
    client = client_for(notebook, tmp_path)
    try:
        with client.setup_kernel():
            for index, cell in cells[: start + 1] + cells:  # raises on a failing cell
                client.execute_cell(cell, index)
    finally:
        left = reap(home)
    outputs = notebook.cells[start].outputs
    assert [(out.output_type, out.get("name")) for out in outputs] == [("stream", "stdout")]
    assert re.fullmatch(
        r"node \w+ is already running \(loader of .*, connected\)\n", outputs[0].text
    )
    assert left == [], f"the notebook left processes behind: {left}"
