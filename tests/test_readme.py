"""README.md's examples run as written (against a real loader standing in for the demo's)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import COOKIE, ROOT, Cluster

pytestmark = pytest.mark.timeout(60)


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a Markdown text."""
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_python_api_block_runs_against_the_demo_address(cluster: Cluster) -> None:
    """The Python API block of README.md runs as is, given a loader where the demo's is."""
    (block,) = [b for b in python_blocks((ROOT / "README.md").read_text()) if "LOADER =" in b]
    cluster.start_loader()
    cookie = cluster.tmp / "home" / ".clustorage" / "demo" / "cookie"
    cookie.parent.mkdir(parents=True)
    cookie.write_text(COOKIE + "\n")
    cookie.chmod(0o600)
    source = block.replace("127.0.0.1:43700", f"127.0.0.1:{cluster.port}")
    assert source != block
    done = subprocess.run(
        [sys.executable, "-c", source],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=40,
    )
    assert done.returncode == 0, done.stderr
    checker = cluster.member("checker")
    assert checker.ok("node.get(['user', 42])") == {"id": 42, "name": "Ada"}
    assert checker.ok("node.call('sum', [2, 3])") == 5
