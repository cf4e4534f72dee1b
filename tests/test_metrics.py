"""The pool metrics count what happened: waits, timeouts, uses, creations, invalidations (on every driver)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from asgi_dbpool import DBPoolMiddleware
from tests.conftest import asyncpg_dsn, wait_for_no_backends
from tests.helpers import PATH, samples, serving

pytestmark = pytest.mark.anyio


async def test_metrics_count_waits_timeouts_uses_and_creations(driver_engine: Callable[..., AsyncEngine]) -> None:
    engine = driver_engine(pool_size=2, max_overflow=0, pool_timeout=0.2)
    app = DBPoolMiddleware(Starlette(), {"main": engine})
    async with serving(app) as client:  # startup: one connection created, used once
        async with engine.connect() as a, engine.connect() as b:
            await a.execute(text("SELECT 1"))
            await b.execute(text("SELECT 1"))
            with pytest.raises(sa_exc.TimeoutError):
                async with engine.connect():
                    pass  # pragma: no cover
            during = samples((await client.get(PATH + "/metrics")).text)
        after = samples((await client.get(PATH + "/metrics")).text)
        response = await client.get(PATH + "/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    main = (("pool_name", "main"),)
    assert during[("db_client_connection_count", (*main, ("state", "used")))] == 2
    assert during[("db_client_connection_count", (*main, ("state", "idle")))] == 0
    assert after[("db_client_connection_count", (*main, ("state", "idle")))] == 2
    assert after[("db_client_connection_max", main)] == 2
    assert after[("db_client_connection_idle_max", main)] == 2
    assert after[("db_client_connection_pending_requests", main)] == 0
    assert after[("db_client_connection_timeouts_total", main)] == 1
    assert after[("asgi_dbpool_checked_out_high_water", main)] == 2
    # the startup ping, the startup read of the server settings, a and b got connections (the timed-out one not)
    assert after[("db_client_connection_wait_time_seconds_count", main)] == 4
    assert after[("db_client_connection_use_time_seconds_count", main)] == 4
    assert after[("db_client_connection_create_time_seconds_count", main)] == 2  # a reused the startup one
    assert after[("db_client_connection_wait_time_seconds_bucket", (("le", "+Inf"), *main))] == 4
    assert after[("db_client_connection_wait_time_seconds_sum", main)] > 0


async def test_invalidations_show_in_metrics(make_engine: Callable[..., AsyncEngine], database_url: str) -> None:
    engine = make_engine(pool_size=1, pool_pre_ping=True)
    app = DBPoolMiddleware(Starlette(), engine)
    async with serving(app) as client:
        async with engine.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        admin = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        # The backend is gone and the client has read its goodbye (a pre-ping racing the server's FATAL message
        # meets asyncpg mid-message: "another operation is in progress", not a disconnect).
        assert await wait_for_no_backends(database_url, make_engine.name_of(engine)) == 0  # type: ignore[attr-defined]
        await asyncio.sleep(0.1)
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))  # pre-ping finds it dead
        metrics = samples((await client.get(PATH + "/metrics")).text)
    assert metrics[("asgi_dbpool_invalidations_total", (("pool_name", "default"),))] == 1
