"""JupyterLab in a real browser: the quickstart notebook runs, and a cluster name completes.

Needs the ``browser`` extra (JupyterLab and Playwright for Python) and a Chromium binary at
/usr/bin/chromium (Debian: ``apt-get install chromium``); skips, saying which is missing,
without them. Set ``CLUSTORAGE_SCREENSHOTS=DIR`` to keep screenshots of ``%cluster_status``
and of a CompileError.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import ROOT, free_port, kill, wait_for_port
from conftest_jupyter import install_kernelspec, isolated_env, reap

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)",
    ),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is not installed: pip install -e '.[browser]'"
)
pytest.importorskip("jupyterlab", reason="JupyterLab is not installed: pip install -e '.[browser]'")


class Lab:
    """A JupyterLab server on a free port, serving one directory, in an isolated HOME."""

    def __init__(self, root: Path, home: Path, jupyter_path: Path) -> None:
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.home = home
        env = isolated_env(home, jupyter_path, JUPYTER_CONFIG_DIR=str(home / ".jupyter"))
        self.log = (root.parent / "lab.log").open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterlab",
                "--no-browser",
                "--expose-app-in-browser",
                f"--port={self.port}",
                "--ip=127.0.0.1",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={root}",
                "--LabApp.news_url=",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                *(["--allow-root"] if os.geteuid() == 0 else []),
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, time.monotonic() + 60, self.proc)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def close(self) -> None:
        """Stop the server, then kill by PID whatever it left (kernels) in its HOME."""
        try:
            kill(self.proc, grace=10)
        finally:
            reap(self.home, grace=5)
            self.log.close()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """JupyterLab serving a copy of notebooks/quickstart.ipynb, clustorage kernel installed."""
    jupyter_path = install_kernelspec(tmp_path / "prefix")
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(ROOT / "notebooks" / "quickstart.ipynb", root)
    home = tmp_path / "home"
    home.mkdir()
    server = Lab(root, home, jupyter_path)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    """A page of headless Debian Chromium with a fresh profile."""
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


# Small scripts run in the page, on JupyterLab's own objects (--expose-app-in-browser).
NOTEBOOK = "window.jupyterapp.shell.currentWidget"
KERNEL_IDLE = f"""() => {{
    const panel = {NOTEBOOK};
    const kernel = panel && panel.sessionContext.session && panel.sessionContext.session.kernel;
    return !!kernel && kernel.status === 'idle';
}}"""
PROMPTS = f"""() => {NOTEBOOK}.content.widgets
    .filter(cell => cell.model.type === 'code')
    .map(cell => cell.model.executionCount)"""


def command(page: Any, name: str) -> None:
    page.evaluate(f"() => window.jupyterapp.commands.execute({name!r})")


def select(page: Any, index: int) -> None:
    page.evaluate(f"() => {{ {NOTEBOOK}.content.activeCellIndex = {index}; }}")


def cell_count(page: Any) -> int:
    return int(page.evaluate(f"() => {NOTEBOOK}.content.widgets.length"))


def set_source(page: Any, index: int, text: str) -> None:
    page.evaluate(
        f"text => {NOTEBOOK}.content.widgets[{index}].model.sharedModel.setSource(text)", text
    )


def wait_until_run(page: Any, indexes: list[int], timeout: float = 120) -> None:
    """Wait until the code cells at ``indexes`` have run and the kernel is idle again."""
    cells = f"{NOTEBOOK}.content.widgets"
    done = f"""() => {{
        const cells = {cells};
        const counts = {indexes}.map(i => cells[i].model.executionCount);
        const busy = {indexes}.some(i => cells[i].node.querySelector('.jp-InputPrompt')
            .textContent.includes('*'));
        return !busy && counts.every(n => n !== null);
    }}"""
    page.wait_for_function(done, timeout=timeout * 1000)
    page.wait_for_function(KERNEL_IDLE, timeout=timeout * 1000)


def screenshot(page: Any, index: int, name: str) -> None:
    """Keep a picture of cell ``index``'s output, when CLUSTORAGE_SCREENSHOTS names a folder."""
    folder = os.environ.get("CLUSTORAGE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        output = page.locator(".jp-Notebook .jp-Cell").nth(index)
        output.scroll_into_view_if_needed()
        output.screenshot(path=str(Path(folder) / f"{name}.png"))


def test_quickstart_runs_in_jupyterlab_and_a_function_name_completes(lab: Lab, page: Any) -> None:
    """In Chromium: every quickstart cell runs without error; %cluster_call fahr<Tab> completes."""
    page.goto(lab.url("lab/tree/quickstart.ipynb"))
    page.wait_for_function(KERNEL_IDLE, timeout=90_000)
    total = cell_count(page)
    last = total - 1  # "stop the second kernel and this node": run it after the checks
    select(page, last)
    command(page, "notebook:run-all-above")
    types = page.evaluate(f"() => {NOTEBOOK}.content.widgets.map(cell => cell.model.type)")
    code = [i for i in range(last) if types[i] == "code"]
    wait_until_run(page, code)
    status_cell = code[-1]
    assert "%cluster_status" in page.evaluate(
        f"() => {NOTEBOOK}.content.widgets[{status_cell}].model.sharedModel.getSource()"
    )
    screenshot(page, status_cell, "cluster_status")

    # A CompileError, as the user sees it, in a cell inserted before the last one.
    select(page, last)
    command(page, "notebook:insert-cell-above")
    set_source(page, last, "%%cluster_call broken\ndef broken(x):\n    return (x +\n")
    select(page, last)
    command(page, "notebook:run-cell")
    page.wait_for_function(
        f"() => {NOTEBOOK}.content.widgets[{last}].node.textContent.includes('CompileError')",
        timeout=60_000,
    )
    shown = page.locator(".jp-Notebook .jp-Cell").nth(last).inner_text()
    assert "line 3" in shown and "return (x +" in shown and "^" in shown
    screenshot(page, last, "compile_error")

    # Completion of a cluster function name, with the Tab key in the editor.
    set_source(page, last, "%cluster_call fahr")
    select(page, last)
    command(page, "notebook:enter-edit-mode")
    page.keyboard.press("Control+End")
    page.keyboard.press("Tab")
    completed = f"""() => {{
        const source = {NOTEBOOK}.content.widgets[{last}].model.sharedModel.getSource();
        const items = [...document.querySelectorAll('.jp-Completer-item')]
            .map(item => item.textContent);
        return source.includes('fahrenheit') || items.some(text => text.includes('fahrenheit'));
    }}"""
    page.wait_for_function(completed, timeout=30_000)
    page.keyboard.press("Escape")
    command(page, "notebook:delete-cell")

    # The last cell cleans up; then the saved notebook has every output, no error.
    select(page, last)
    command(page, "notebook:run-cell")
    wait_until_run(page, [last])
    command(page, "docmanager:save")
    page.wait_for_function(f"() => !{NOTEBOOK}.context.model.dirty", timeout=30_000)
    saved = nbformat.read(lab.home.parent / "root" / "quickstart.ipynb", as_version=4)
    cells = [cell for cell in saved.cells if cell.cell_type == "code"]
    assert len(saved.cells) == total and all(cell.execution_count for cell in cells)
    errors = [out for cell in cells for out in cell.outputs if out.output_type == "error"]
    assert errors == []
    status = next(cell for cell in cells if "%cluster_status" in cell.source)
    assert any("text/html" in out.get("data", {}) for out in status.outputs)
