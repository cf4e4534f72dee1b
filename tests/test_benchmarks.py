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
