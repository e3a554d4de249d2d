"""The bench runs (a tiny --quick mode); its figures are not checked: benchmarks are not tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.timeout(90)
def test_hit_bench_runs() -> None:
    done = run([str(BENCH / "hit.py"), "--quick"], timeout=80)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ns/op" in done.stdout.splitlines()[0]


@pytest.mark.timeout(240)
def test_run_bench_quick(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    done = run([str(BENCH / "run.py"), "--quick", "--json", str(results)], timeout=230)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "measure / system" in done.stdout
    assert "median" in done.stdout
    assert results.exists()


@pytest.mark.timeout(90)
def test_cpu_bench_runs() -> None:
    done = run([str(BENCH / "cpu.py"), "--quick"], timeout=80)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "server CPU" in lines[0]
    assert sum("miss" in line for line in lines) == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("measure", [[], ["--transfer"]], ids=["miss", "transfer"])
def test_ab_bench_runs(measure: list[str]) -> None:
    done = run([str(BENCH / "ab.py"), str(ROOT), str(ROOT), "--quick", *measure], timeout=110)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.splitlines()[-1].startswith("B/A ")


@pytest.mark.timeout(120)
def test_busy_bench_runs() -> None:
    done = run([str(BENCH / "busy.py"), "--quick"], timeout=110)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "while it commits" in done.stdout and "nodes that left meanwhile" in done.stdout
