"""Every notebook in notebooks/ runs top to bottom, unattended, on the clustorage kernel."""

from __future__ import annotations

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


@pytest.mark.timeout(90)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom_and_cleans_up(
    path: Path, jupyter_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Executed by nbclient: no cell fails, and no process it started outlives it."""
    home = tmp_path / "home"
    home.mkdir()
    for key, value in isolated_env(home, jupyter_path).items():
        monkeypatch.setenv(key, value)
    for key in CLUSTORAGE_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=60,
        kernel_name="clustorage",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        client.execute()
    finally:
        left = reap(home)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code)
    errors = [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert errors == []
    assert left == [], f"the notebook left processes behind: {left}"
