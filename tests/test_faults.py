"""Faults under a real server: database down at startup, restarted mid-traffic, gone during shutdown."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from demo_app.embedded import EmbeddedPostgres
from tests.servers import Run

pytestmark = [pytest.mark.anyio, pytest.mark.servers]


@pytest.fixture
def private_db(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """An embedded PostgreSQL of the test's own, which it may stop and start again."""
    with EmbeddedPostgres(tmp_path / "pg") as db:
        yield db


@pytest.mark.parametrize(("server", "exit_code"), [("uvicorn", 3), ("hypercorn", 0), ("granian", 1)])
async def test_database_down_at_startup(server: str, exit_code: int, tmp_path: Path) -> None:
    """One readable line naming the database, password masked; each server's own exit status (README)."""
    url = "postgresql+asyncpg://app:s3cret@127.0.0.1:1/appdb"
    run = Run(server=server, wrapped=True, database_url=url, log_path=tmp_path / "out.log")
    started = time.monotonic()
    run.start(graceful=1)
    assert await run.wait_exit(20) == exit_code
    assert time.monotonic() - started < 15
    output = run.output()
    line = (
        "asgi_dbpool: cannot reach database 'default' at postgresql+asyncpg://app:***@127.0.0.1:1/appdb: "
        "ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 1)"
    )
    assert line in output
    assert "s3cret" not in output
    if server in ("uvicorn", "granian"):
        assert "Traceback" not in output
        assert output.count("cannot reach database") == 1
    else:  # hypercorn prints its own LifespanFailureError traceback, carrying our line, and nothing chained
        assert output.count("Traceback (most recent call last)") == 1, output
        assert "LifespanFailureError" in output
        assert "asyncpg" not in output.replace("postgresql+asyncpg", "")  # none of the driver's internals
        assert "The above exception was the direct cause" not in output
        assert "During handling of the above exception" not in output


async def test_database_restarted_mid_traffic(private_db: EmbeddedPostgres, tmp_path: Path) -> None:
    run = Run(server="uvicorn", wrapped=True, database_url=private_db.url, log_path=tmp_path / "out.log")
    run.start(graceful=1)
    await run.wait_up()
    async with httpx.AsyncClient(base_url=run.base, timeout=10) as client:
        for _ in range(5):
            assert (await client.get("/read")).json() == {"value": 7}
        await asyncio.to_thread(private_db.stop)
        assert (await client.get("/read")).status_code == 500  # the outage is visible...
        await asyncio.to_thread(private_db.start)
        back = time.monotonic()
        # ...and ends: within 2 s of the database coming back every request succeeds again.
        statuses = []
        while time.monotonic() - back < 2:
            statuses.append((await client.get("/read")).status_code)
        recovered = statuses.index(200)  # raises if it never recovered within the 2 s
        assert statuses[recovered:] == [200] * (len(statuses) - recovered), statuses  # and stays recovered
        assert len(statuses) - recovered >= 10, statuses
        stats = (await client.get("/api/system/database/pool")).json()
        assert stats["invalid"] >= 1  # the stale pooled connections were invalidated, and counted
        assert stats["status"] == "ok"
    run.signal(signal.SIGTERM)
    assert await run.wait_exit() == -signal.SIGTERM
    shutdown = run.output().split("Shutting down", 1)[1]
    for marker in ("Traceback", "Event loop is closed", "was never awaited", "Exception terminating"):
        assert marker not in shutdown, shutdown
    assert "shutdown finished in" in shutdown


async def test_database_gone_during_shutdown(private_db: EmbeddedPostgres, tmp_path: Path) -> None:
    run = Run(server="uvicorn", wrapped=True, database_url=private_db.url, log_path=tmp_path / "out.log")
    run.start(graceful=1, extra_env={"MATRIX_SHUTDOWN_TIMEOUT": "3"})
    await run.wait_up()
    async with httpx.AsyncClient(base_url=run.base, timeout=10) as client:
        assert (await client.get("/leak")).status_code == 200
        await asyncio.gather(*(client.get("/slow") for _ in range(3)))  # three pooled connections
    await asyncio.to_thread(private_db.stop)
    started = time.monotonic()
    run.signal(signal.SIGTERM)
    assert await run.wait_exit() == -signal.SIGTERM
    assert time.monotonic() - started < 3 + 2  # shutdown_timeout plus process teardown
    shutdown = run.output().split("Shutting down", 1)[1]
    assert "Traceback" not in shutdown, shutdown
    for marker in ("Event loop is closed", "was never awaited", "Exception terminating", "Exception closing"):
        assert marker not in shutdown, shutdown
    assert "1 engine(s) disposed; leaks: 1 closed (see warnings above)" in shutdown
    assert "shutdown finished in" in shutdown
