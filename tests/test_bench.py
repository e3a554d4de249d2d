"""The bench runs (a tiny --quick mode); its figures are not checked: benchmarks are not tests."""

from __future__ import annotations

import json
import shutil
import socket
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
    """run.py --quick runs every measure; its 1000-member scenario runs with 200 members,
    every phase recorded (no timing is checked)."""
    results = tmp_path / "results.json"
    done = run([str(BENCH / "run.py"), "--quick", "--json", str(results)], timeout=230)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "measure / system" in done.stdout
    assert "median" in done.stdout
    rows = json.loads(results.read_text())["results"]
    prefix = "200 members on one loader"
    thousand = [row for row in rows if row["measure"].startswith(f"{prefix}: ")]
    measures = {row["measure"] for row in thousand}
    for phase in ("all joined", "define acked by all", "trivial miss from one more member"):
        assert f"{prefix}: {phase}" in measures, sorted(measures)
    assert f"{prefix}: loader RSS" in measures
    assert any("MB value" in row["measure"] for row in thousand)
    failed = [row for row in thousand if row["note"].startswith("FAILED")]
    assert not failed, failed


@pytest.mark.timeout(90)
@pytest.mark.parametrize("store", [[], ["--durable"]], ids=["memory", "durable"])
def test_cpu_bench_runs(store: list[str]) -> None:
    done = run([str(BENCH / "cpu.py"), "--quick", *store], timeout=80)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "server CPU" in lines[0]
    assert sum("miss" in line for line in lines) == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "measure",
    [[], ["--transfer"], ["--tls"], ["--writes", "2"], ["--durable"], ["--define", "2"]],
    ids=["miss", "transfer", "tls", "writes", "durable", "define"],
)
def test_ab_bench_runs(measure: list[str]) -> None:
    """bench/ab.py --quick runs two trees side by side and prints their ratio."""
    if "--tls" in measure:
        pytest.importorskip("cryptography")
    done = run([str(BENCH / "ab.py"), str(ROOT), str(ROOT), "--quick", *measure], timeout=110)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.splitlines()[-1].startswith("B/A ")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("store", [[], ["--durable"]], ids=["memory", "durable"])
def test_core_cpu_bench_runs(store: list[str]) -> None:
    """bench/core_cpu.py --quick times the loader's request path of two trees in turns."""
    done = run([str(BENCH / "core_cpu.py"), str(ROOT), str(ROOT), "--quick", *store], timeout=110)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.splitlines()[-1].startswith("B/A ")


@pytest.mark.timeout(120)
def test_busy_bench_runs() -> None:
    done = run([str(BENCH / "busy.py"), "--quick"], timeout=110)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "while it commits" in done.stdout and "nodes that left meanwhile" in done.stdout


@pytest.mark.timeout(30)
def test_tcp_bytes_sent_counts_what_a_server_sent() -> None:
    """tcp_bytes_sent sums the bytes a server sent on its port's connections."""
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    sys.path.insert(0, str(BENCH))
    try:
        from benchlib import tcp_bytes_sent
    finally:
        sys.path.remove(str(BENCH))
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        accepted = [server.accept()[0] for _ in clients]
        try:
            before = tcp_bytes_sent(port)
            for i, connection in enumerate(accepted):
                connection.sendall(b"x" * (100_000 * (i + 1)))
            for i, client in enumerate(clients):
                received = 0
                while received < 100_000 * (i + 1):
                    received += len(client.recv(1 << 20))
            assert before is not None
            assert tcp_bytes_sent(port) == before + 300_000
        finally:
            for sock in [*clients, *accepted]:
                sock.close()


@pytest.mark.timeout(120)
def test_tls_bench_runs() -> None:
    """bench/tls.py --quick prints each figure with TLS beside plaintext."""
    pytest.importorskip("cryptography")
    done = run([str(BENCH / "tls.py"), "--quick"], timeout=110)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for figure in ("TLS/plaintext median, miss", "define, acked by 8", "MB, put + get"):
        assert figure in done.stdout


@pytest.mark.timeout(120)
def test_loops_bench_runs() -> None:
    """bench/loops.py --quick prints the loader on uvloop beside it on asyncio's loop."""
    pytest.importorskip("uvloop", reason="uvloop is not installed (no wheel for this platform)")
    done = run([str(BENCH / "loops.py"), "--quick"], timeout=110)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "uvloop/asyncio" in done.stdout
