"""The report's reproduction under real servers in a fresh process: noisy without the middleware, silent with it.

Counted as noise: every WARNING-or-worse record from sqlalchemy, asyncpg, asyncio and py.warnings after
shutdown began, and every unraisable exception (what "coroutine ... was never awaited" becomes), including
what the garbage collector does with leaked sessions after ``asyncio.run`` returned.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MARIADB_DRIVERS, disconnections, unclean_disconnects, url_for
from tests.mariadb import MariaDB

ROOT = Path(__file__).resolve().parent.parent
_runs = itertools.count()


def run_repro(server: str, wrapped: bool, database_url: str, name: str = "repro") -> dict[str, Any]:
    env = {
        **os.environ,
        "ASGI_DBPOOL_TEST_DATABASE_URL": database_url,
        "ASGI_DBPOOL_REPRO_NAME": name,
        "PYTHONPATH": str(ROOT),
    }
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
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
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


# -- the same reproduction on the other drivers -------------------------------------------------------------------
#
# Server side: PostgreSQL's log (a client that vanished), MariaDB's Aborted_clients (a session that ended without
# COM_QUIT) against its Connections counter (every session the run opened). SQLite has no server to ask.

TASKS_CANCELLED = re.compile(r"cancelling (\d+) task\(s\) still holding connections")


def run_driver_repro(driver: str, server: str, wrapped: bool, request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    url = url_for(driver, request, tmp_path)
    mariadb: MariaDB | None = request.getfixturevalue("mariadb") if driver in MARIADB_DRIVERS else None
    name = f"repro_{os.getpid()}_{next(_runs)}"
    before = mariadb.status() if mariadb else {}
    admin_before = mariadb.admin_sessions if mariadb else 0
    offset = len(mariadb.log_text()) if mariadb else 0
    result = run_repro(server, wrapped, url, name)
    if mariadb is not None:
        assert mariadb.wait_for_no_connections() == 0
        after = mariadb.status()
        result["aborted_clients"] = after["Aborted_clients"] - before["Aborted_clients"]
        result["aborted_connects"] = after["Aborted_connects"] - before["Aborted_connects"]
        # Connections counts our own admin sessions too (the status reads, the processlist polls).
        result["sessions"] = after["Connections"] - before["Connections"] - (mariadb.admin_sessions - admin_before)
        result["aborted_log"] = mariadb.aborted_lines(offset)
    elif driver == "psycopg":
        result["unclean"] = unclean_disconnects([name])
        result["disconnections"] = disconnections(name)
    return result


@pytest.mark.servers
def test_psycopg_without_the_middleware_is_noisy_but_clean_on_the_server(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """psycopg cannot be terminated, so SQLAlchemy drops what the garbage collector finds (ERROR records); libpq
    still says goodbye when the dropped connection is freed: PostgreSQL's log shows no client that vanished."""
    result = run_driver_repro("psycopg", "uvicorn", False, request, tmp_path)
    assert result["served"] == 4
    noise = result["noise"]
    gc_records = [line for line in noise if "garbage collector is trying to clean up non-checked-in" in line]
    assert len(gc_records) == 2, noise  # the two leaked sessions
    assert all("psycopg.AsyncConnection" in line for line in gc_records)
    assert result["unclean"] == []  # quiet without us on the server side: kept as a regression check
    assert result["disconnections"] >= 3


@pytest.mark.servers
@pytest.mark.parametrize("driver", MARIADB_DRIVERS)
def test_mysql_drivers_without_the_middleware_are_noisy_and_abort_every_session(
    driver: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """aiomysql: 5 or 6 records (its Connection.__del__, unraisable, among them); asyncmy: 4."""
    result = run_driver_repro(driver, "uvicorn", False, request, tmp_path)
    assert result["served"] == 4
    noise = result["noise"]
    terminating = [n for n in noise if "Exception terminating connection" in n and "Event loop is closed" in n]
    assert len(terminating) == 2, noise  # the two leaked sessions
    assert all(f"<{driver}.connection.Connection object" in n for n in terminating)
    gc_records = [n for n in noise if "garbage collector is trying to clean up non-checked-in connection" in n]
    assert len(gc_records) == 2, noise
    # aiomysql's Connection.__del__ (one per leaked connection, or one of the two) after the loop closed.
    unraisable = [n.partition(" at 0x")[0] for n in noise if n.startswith("unraisable")]
    by_del = {"unraisable RuntimeError: Event loop is closed in <function Connection.__del__"}
    assert set(unraisable) == (by_del if driver == "aiomysql" else set()), noise
    # On a loaded machine the bare app's shutdown can also cancel a connection's reset (CI's lowest column: once in
    # four runs): one more record of the same noise, never another kind.
    resets = [n for n in noise if n.endswith("ERROR Exception during reset or similar EXC CancelledError()")]
    assert len(resets) <= 2, noise
    assert len(noise) == 4 + len(unraisable) + len(resets), noise
    # No session said COM_QUIT: MariaDB counts every one as an aborted client and logs it.
    assert result["sessions"] >= 3
    assert result["aborted_clients"] == result["sessions"]
    assert len(result["aborted_log"]) == result["sessions"]
    assert result["aborted_connects"] == 0


@pytest.mark.servers
def test_aiosqlite_without_the_middleware_is_noisy(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    result = run_driver_repro("aiosqlite", "uvicorn", False, request, tmp_path)
    assert result["served"] == 4
    noise = result["noise"]
    gc_records = [line for line in noise if "garbage collector is trying to clean up non-checked-in" in line]
    assert len(gc_records) == 2, noise  # the two leaked sessions


@pytest.mark.servers
@pytest.mark.parametrize("driver", ["psycopg", "aiomysql", "asyncmy", "aiosqlite"])
def test_with_the_middleware_every_driver_is_silent(
    driver: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Under uvicorn, like the controls (hypercorn runs every driver in the real-server matrix, test_servers)."""
    result = run_driver_repro(driver, "uvicorn", True, request, tmp_path)
    assert result["served"] == 4
    assert result["noise"] == []
    assert result["stderr"] == []
    events = result["events"]
    assert isinstance(events, list)
    leak_reports = [line for line in events if "closing a leaked connection checked out at" in line]
    assert len(leak_reports) == 2
    assert all(f"{ROOT}/tests/apps/repro.py:" in line for line in leak_reports)
    assert "INFO 1 engine(s) disposed; leaks: 2 closed (see warnings above)" in events
    assert "client saw close code 1012" in events
    assert [line for line in events if line.startswith(("ERROR", "CRITICAL"))] == []
    if driver == "psycopg":
        assert result["unclean"] == []
    elif driver in MARIADB_DRIVERS:
        # Every session said COM_QUIT but one whose query was cut: a background task the app never stops,
        # cancelled by the shutdown mid-query (MariaDB still sends the result; the closed socket answers RST).
        # Cancelled between its query and its checkin, the same task costs nothing.
        cut = sum(int(m.group(1)) for line in events if (m := TASKS_CANCELLED.search(line)))
        assert 0 <= result["aborted_clients"] <= cut, events
        assert len(result["aborted_log"]) == result["aborted_clients"]
        assert result["aborted_connects"] == 0
        assert result["sessions"] >= 3
