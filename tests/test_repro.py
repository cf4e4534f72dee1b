"""The report's reproduction under real servers in a fresh process: noisy without the middleware, silent with it.

Counted as noise: every WARNING-or-worse record from sqlalchemy, asyncpg, asyncio and py.warnings after
shutdown began, and every unraisable exception (what "coroutine ... was never awaited" becomes), including
what the garbage collector does with leaked sessions after ``asyncio.run`` returned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_repro(server: str, wrapped: bool, database_url: str) -> dict[str, list[str] | int]:
    env = {**os.environ, "ASGI_DBPOOL_TEST_DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.apps.repro", server, "on" if wrapped else "off"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, list[str] | int] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stderr"] = [line for line in proc.stderr.splitlines() if "Running on" not in line]
    return result


@pytest.mark.servers
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
def test_without_the_middleware_the_noise_appears(server: str, database_url: str) -> None:
    result = run_repro(server, False, database_url)
    assert result["served"] == 4
    noise = result["noise"]
    assert isinstance(noise, list)
    assert any("Exception terminating connection" in line for line in noise), noise
    assert any("garbage collector is trying to clean up non-checked-in connection" in line for line in noise), noise


@pytest.mark.servers
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
def test_with_the_middleware_there_is_none(server: str, database_url: str) -> None:
    result = run_repro(server, True, database_url)
    assert result["served"] == 4
    assert result["noise"] == []
    assert result["stderr"] == []
    events = result["events"]
    assert isinstance(events, list)
    leak_reports = [line for line in events if "closing a leaked connection checked out at" in line]
    assert len(leak_reports) == 2
    assert all(f"{ROOT}/tests/apps/repro.py:" in line for line in leak_reports)
    assert "INFO 1 engine(s) disposed; leaks: 2 closed (see warnings above)" in events
    # uvicorn closes open WebSockets itself before lifespan.shutdown; under hypercorn the middleware's shutdown
    # trigger does (hypercorn itself would only after its graceful timeout, and on Python 3.12+ never).
    assert "client saw close code 1012" in events
    if server == "hypercorn":
        assert "INFO the server is stopping: 1 WebSocket(s) closed with 1012" in events
    assert [line for line in events if not line.startswith(("INFO", "WARNING", "client saw"))] == []
    assert sum(line.startswith("WARNING") for line in events) == 2
