"""A smoke run of every benchmark (one tiny round): the harness works; no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    headings = ("Bytecodes per operation", "Per-request overhead", "Pool checkout/checkin loop", "End to end")
    for heading in (*headings, "Shutdown latency", "Overload"):
        assert f"## {heading}" in proc.stdout
    assert "| DBPoolMiddleware |" in proc.stdout
    assert not (tmp_path / "r.md").exists()  # a smoke run is not a measurement: RESULTS.md is not written


def test_bytecode_counts_are_exact_whatever_the_layout(database_url: str) -> None:
    """The traced counts name the middleware's functions and do not move with the hash seed and the environment,
    which move the instruction counts (the reason the bytecode table exists); the plain engine runs none of ours."""
    from benchmarks.instructions import child_env

    def count(variant: str, layout: int) -> dict[str, Any]:
        env = child_env(database_url, layout)
        command = [sys.executable, "-m", "benchmarks.bytecodes", "child", "checkout", variant]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
        figures: dict[str, Any] = json.loads(done.stdout)
        return figures

    wrapped = count("DBPoolMiddleware", 0)
    assert count("DBPoolMiddleware", 3) == wrapped
    assert set(wrapped["own"]) == {
        "checkout._user_frames",
        "tracked_pool._do_get",
        "tracked_pool._do_return_conn",
        "checkout.checkout_frames",
    }
    plain = count("plain engine", 0)
    assert plain["own"] == {}
    # Those four, and asyncio.current_task, a Python function before 3.12.
    assert round(wrapped["frames"] - plain["frames"], 6) == (5 if sys.version_info < (3, 12) else 4)
