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
    kept; a floor above it says how many instructions the target leaves the rest of the middleware, beside what
    that rest takes and the features it carries."""
    from benchmarks.instructions import BOOKKEEPING, _missed

    floor = "floor: request record + send hook"
    cost = {"bare": 100.0e3, floor: 110.0e3, "DBPoolMiddleware": 112.0e3}
    ratio = {"bare": 1.0, floor: 0.909, "DBPoolMiddleware": 0.893}
    out_of_reach = _missed("w", "DBPoolMiddleware", 0.97, floor, cost, ratio)
    assert out_of_reach == (
        "- w, DBPoolMiddleware: 0.893 (target 0.97). The floor, the request's record in a context variable (a "
        "checkout in a task the request spawned finds it) and the send hook (the 503 in place of the app's 500, the "
        "end of the response for the commit-after-response warning), is 0.909 by itself: the target cannot be met "
        f"while these features stay. The rest, 2.0 k, is the bookkeeping of the other features: {BOOKKEEPING[floor]} "
        "(docs/benchmarks.md measures each part)."
    )
    within_reach = _missed("w", "DBPoolMiddleware", 0.90, floor, cost, ratio)
    # 100 k / 0.90 = 111.1 k in all: 1.1 k above the floor's 110 k, where the middleware takes 2.0 k.
    assert "is 0.909 by itself: the target leaves 1.1 k instructions for the rest of the middleware. " in within_reach
    assert "The rest, 2.0 k, is the bookkeeping of the other features: per request, " in within_reach
