"""Pool advice on a real pool, at its endpoint and from the advise command."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from asgi_dbpool import DBPoolMiddleware
from asgi_dbpool.__main__ import format_advice
from tests.helpers import PATH, serving

pytestmark = pytest.mark.anyio


async def test_advice_grows_a_pool_that_timed_out(make_engine: Callable[..., AsyncEngine]) -> None:
    engine = make_engine(pool_size=1, max_overflow=0, pool_timeout=0.1)
    app = DBPoolMiddleware(Starlette(), engine)
    async with serving(app) as client:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            with pytest.raises(sa_exc.TimeoutError):
                async with engine.connect():
                    pass  # pragma: no cover
        advice = (await client.get(PATH + "/advice")).json()["engines"]["default"]
    assert advice["observed"]["timeouts"] == 1
    assert advice["advice"][0] == {
        "setting": "DB_POOL_SIZE",
        "current": 1,
        "suggested": 2,
        "why": "1 checkout(s) timed out waiting for a connection: grow the pool (or find the slow queries holding "
        "connections)",
    }
    assert "DB_POOL_SIZE: 1 -> 2  (1 checkout(s) timed out" in format_advice({"engines": {"default": advice}})


async def test_advice_shrinks_an_idle_pool_and_fits_recycle_to_the_server(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    engine = make_engine(
        pool_size=20,
        max_overflow=20,
        pool_recycle=3600,
        connect_args={"server_settings": {"idle_session_timeout": "600000"}},
    )
    app = DBPoolMiddleware(Starlette(), engine)
    async with serving(app) as client:
        for _ in range(100):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        advice = (await client.get(PATH + "/advice")).json()["engines"]["default"]
    by_setting = {item["setting"]: item for item in advice["advice"]}
    assert by_setting["DB_POOL_SIZE"]["current"] == 20
    assert by_setting["DB_POOL_SIZE"]["suggested"] == 2
    assert "at most 1 of 20 connections were ever checked out" in by_setting["DB_POOL_SIZE"]["why"]
    assert by_setting["DB_POOL_RECYCLE"] == {
        "setting": "DB_POOL_RECYCLE",
        "current": 3600,
        "suggested": 480,
        "why": "the server closes idle sessions after 600s (idle_session_timeout): recycle connections before that",
    }


@pytest.mark.servers
async def test_advise_cli_reads_a_running_app(database_url: str, tmp_path: Any) -> None:
    import signal
    import subprocess
    import sys

    from tests.servers import ROOT, Run

    run = Run(server="uvicorn", wrapped=True, database_url=database_url, log_path=tmp_path / "out.log")
    run.start(graceful=1)
    try:
        await run.wait_up()
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "asgi_dbpool", "advise", f"{run.base}{PATH}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        missing = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "asgi_dbpool", "advise", f"{run.base}/nowhere"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        run.signal(signal.SIGTERM)
        await run.wait_exit()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("engine 'default': pool_size=20, max_overflow=10, pool_recycle=3600, cpu_count=")
    assert "DB_MAX_OVERFLOW: 10 -> 20  (rule of thumb: 1-2 x DB_POOL_SIZE = 20-40)" in proc.stdout
    assert missing.returncode == 1
    assert missing.stderr.startswith(f"asgi_dbpool: could not read {run.base}/nowhere/advice: HTTP Error 404")
