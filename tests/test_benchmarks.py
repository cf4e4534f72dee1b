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


def test_against_exports_a_revision_and_its_children_import_it(database_url: str, tmp_path: Path) -> None:
    """``--against REV``: the revision's package is exported from git, and a child given it (``BENCH_PACKAGE``)
    imports it instead of this tree's, even one without the modules the floors use (an earlier layout); without
    it, this tree's. A revision git does not know is a ValueError naming it."""
    from benchmarks.against import export
    from benchmarks.instructions import child_env

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    exported = tmp_path / "head"
    exported.mkdir()
    assert export("HEAD", exported) == head.stdout.strip()
    assert (exported / "asgi_dbpool" / "asgi" / "middleware.py").is_file()
    earlier = tmp_path / "earlier" / "asgi_dbpool"
    earlier.mkdir(parents=True)
    (earlier / "__init__.py").write_text("from .middleware import DBPoolMiddleware\n")
    (earlier / "middleware.py").write_text("class DBPoolMiddleware:\n    pass\n")
    code = "import benchmarks.instructions, benchmarks.apps, asgi_dbpool; print(asgi_dbpool.__file__)"
    imported = {}
    for name, package in (("head", str(exported)), ("earlier", str(earlier.parent)), ("this tree", None)):
        env = child_env(database_url, 0, package)
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        imported[name] = Path(done.stdout.strip())
    assert imported == {
        "head": exported / "asgi_dbpool" / "__init__.py",
        "earlier": earlier / "__init__.py",
        "this tree": ROOT / "asgi_dbpool" / "__init__.py",
    }
    with pytest.raises(
        ValueError, match=r"^--against 'no-such-revision': fatal: .*; give a commit of this repository\.$"
    ):
        export("no-such-revision", tmp_path)


def test_against_smoke(database_url: str, tmp_path: Path) -> None:
    """``python -m benchmarks --smoke --only --against HEAD --workloads query``: only the comparison's section, its
    children run on both packages; nothing is written."""
    env = {**os.environ, "BENCH_DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "benchmarks", "--smoke", "--only", "--against", "HEAD", "--workloads", "query"]
    proc = subprocess.run(
        [*command, "--output", str(tmp_path / "r.md")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    sections = [line for line in proc.stdout.splitlines() if line.startswith("## ")]
    assert sections == ["## Instructions per operation against HEAD (both packages in the same layouts)"]
    assert (
        f"Smoke run: every workload ran natively on {head.stdout.strip()}'s package and on this tree's" in proc.stdout
    )
    assert not (tmp_path / "r.md").exists()
