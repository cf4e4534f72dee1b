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


def traced(database_url: str, workload: str, variant: str, layout: int = 0) -> dict[str, Any]:
    """The bytecode benchmark's child for (``workload``, ``variant``) in memory layout ``layout``: its counts."""
    from benchmarks.instructions import child_env

    command = [sys.executable, "-m", "benchmarks.bytecodes", "child", workload, variant]
    env = child_env(database_url, layout)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
    figures: dict[str, Any] = json.loads(done.stdout)
    return figures


def test_bytecode_counts_are_exact_whatever_the_layout(database_url: str) -> None:
    """The traced counts name the middleware's functions and do not move with the hash seed and the environment,
    which move the instruction counts (the reason the bytecode table exists); the plain engine runs none of ours."""
    wrapped = traced(database_url, "checkout", "DBPoolMiddleware")
    assert traced(database_url, "checkout", "DBPoolMiddleware", layout=3) == wrapped
    assert set(wrapped["own"]) == {
        "checkout._user_frames",
        "tracked_pool._do_get",
        "tracked_pool._do_return_conn",
        "checkout.checkout_frames",
    }
    plain = traced(database_url, "checkout", "plain engine")
    assert plain["own"] == {}
    # Those four, and asyncio.current_task, a Python function before 3.12.
    assert round(wrapped["frames"] - plain["frames"], 6) == (5 if sys.version_info < (3, 12) else 4)


def test_served_bytecodes_count_the_middleware_in_a_real_server(database_url: str) -> None:
    """The served workload's trace runs uvicorn in the child and counts the event loop's thread: per request, the
    pool's and the send hook's functions run exactly what they run for the same request in process; the bare app
    runs none of ours."""
    bare, served = traced(database_url, "served", "bare"), traced(database_url, "served", "DBPoolMiddleware")
    in_process = traced(database_url, "query", "DBPoolMiddleware")["own"]
    assert bare["own"] == {}
    same = ("tracked_pool._do_get", "tracked_pool._do_return_conn", "request.send", "checkout.checkout_frames")
    assert {name: served["own"][name] for name in same} == {name: in_process[name] for name in same}
    # The middleware's call itself: within a bytecode of the in-process one (the scopes differ: a server's has more).
    assert abs(served["own"]["middleware.__call__"] - in_process["middleware.__call__"]) <= 1
    assert 0 < served["bytecodes"] - bare["bytecodes"] < 2 * sum(in_process.values())
