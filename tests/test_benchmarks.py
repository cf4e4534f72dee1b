"""A smoke run of every benchmark (one tiny round): the harness works; no timing is asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.servers
def test_benchmarks_smoke(database_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "BENCH_DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--output", str(tmp_path / "r.md")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for heading in ("Per-request overhead", "Pool checkout/checkin loop", "End to end", "Shutdown latency", "Overload"):
        assert f"## {heading}" in proc.stdout
    assert "| DBPoolMiddleware |" in proc.stdout
    assert not (tmp_path / "r.md").exists()  # a smoke run is not a measurement: RESULTS.md is not written


def test_a_missed_target_is_judged_by_its_floor() -> None:
    """The verdict under the instruction table: a floor below the target proves it out of reach with the features
    kept; a floor above it leaves the rest to the middleware (the same figures, a different verdict)."""
    from benchmarks.instructions import _missed

    costs = {"bare": 100.0e3, "floor: request record + send hook": 110.0e3, "DBPoolMiddleware": 112.0e3}
    out_of_reach = _missed("w", "DBPoolMiddleware", 0.97, costs, 100.0e3)
    assert out_of_reach.startswith("- w, DBPoolMiddleware: 0.893 (target 0.97). The floor, ")
    assert "is 0.909 by itself, so the target cannot be met while these features stay" in out_of_reach
    assert "adds 2.0 k instructions" in out_of_reach
    within_reach = _missed("w", "DBPoolMiddleware", 0.90, costs, 100.0e3)
    assert "is 0.909 by itself, so the target is within reach of the features" in within_reach
