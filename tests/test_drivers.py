"""Per driver: the engine PoolSettings builds (the query timeout in the driver's own terms, really enforced), the
ConfigError for a driver asgi_dbpool does not support (from PoolSettings and from the middleware), and the
connection-budget check and advice per dialect."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette

from asgi_dbpool import DBPoolMiddleware, PoolSettings, mask_url
from asgi_dbpool.pool.dialects import abort, wait_closed
from tests.conftest import MARIADB_DRIVERS
from tests.mariadb import MariaDB

pytestmark = pytest.mark.anyio
PATH = "/api/system/database/pool"

#: How each driver's query timeout reads back from a live connection (1.5 s asked for).
TIMEOUT_READ = {
    "psycopg": ("SHOW statement_timeout", "1500ms"),
    "aiomysql": ("SELECT @@max_statement_time", 1.5),
    "asyncmy": ("SELECT @@max_statement_time", 1.5),
    "aiosqlite": ("PRAGMA busy_timeout", 1500),  # sqlite3's timeout is its busy timeout, in milliseconds
}
#: A query that outlasts a 0.3 s timeout, where the database has one.
SLOW = {
    "asyncpg": "SELECT pg_sleep(5)",
    "psycopg": "SELECT pg_sleep(5)",
    "aiomysql": "SELECT SLEEP(5)",
    "asyncmy": "SELECT SLEEP(5)",
}


async def test_settings_build_an_engine_with_the_drivers_own_query_timeout(driver: str, driver_url: str) -> None:
    engine = PoolSettings(pool_size=3, max_overflow=2, query_timeout=1.5).create_async_engine(driver_url)
    try:
        assert engine.url.drivername == driver_url.split(":", 1)[0]
        assert (engine.pool.size(), engine.pool._max_overflow, engine.pool._recycle) == (3, 2, 3600)  # type: ignore[attr-defined]
        async with engine.connect() as conn:
            if driver == "asyncpg":
                raw = await conn.get_raw_connection()
                assert raw.driver_connection._config.command_timeout == 1.5  # type: ignore[union-attr]
            else:
                query, expected = TIMEOUT_READ[driver]
                assert (await conn.execute(text(query))).scalar_one() == expected
    finally:
        await engine.dispose()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg", "aiomysql", "asyncmy"])
async def test_the_query_timeout_cuts_a_slow_query(driver: str, driver_url: str) -> None:
    engine = PoolSettings(pool_size=1, max_overflow=0, query_timeout=0.3).create_async_engine(driver_url)
    try:
        started = time.monotonic()
        # asyncpg's timeout is the client's: its TimeoutError passes through SQLAlchemy as it is.
        with pytest.raises(TimeoutError if driver == "asyncpg" else sa_exc.DBAPIError) as info:
            async with engine.connect() as conn:
                await conn.execute(text(SLOW[driver]))
        assert time.monotonic() - started < 2.5
        if driver != "asyncpg":
            said = str(info.value.orig)  # type: ignore[attr-defined]
            expected = {
                "psycopg": "canceling statement due to statement timeout",
                "aiomysql": "max_statement_time exceeded",
                "asyncmy": "max_statement_time exceeded",
            }[driver]
            assert expected in said, said
        async with engine.connect() as conn:  # the pool goes on working
            assert (await conn.execute(text("SELECT 7"))).scalar_one() == 7
    finally:
        await engine.dispose()


@pytest.mark.parametrize("driver", ["aiomysql", "asyncmy"])
async def test_mariadb_budget_is_checked_against_its_max_connections(
    caplog: pytest.LogCaptureFixture, driver_engine: Callable[..., AsyncEngine]
) -> None:
    caplog.set_level(logging.INFO, logger="asgi_dbpool")
    engine = driver_engine(pool_size=30, max_overflow=40)
    async with LifespanManager(DBPoolMiddleware(Starlette(), engine, workers=4)):
        pass
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert line == (
        f"connection budget exceeded on {mask_url(engine.url)}: 4 worker(s) x (30 + 40) = 280 connections > "
        "max_connections 100 - reserved 0 = 100; lower DB_POOL_SIZE / DB_MAX_OVERFLOW or raise max_connections"
    )
    caplog.clear()
    async with LifespanManager(DBPoolMiddleware(Starlette(), driver_engine(pool_size=10, max_overflow=15), workers=4)):
        pass  # 4 x 25 = 100 fits
    assert [r for r in caplog.records if r.levelno >= logging.WARNING or "connection budget" in r.getMessage()] == []


@pytest.mark.parametrize("driver", MARIADB_DRIVERS)
async def test_mysql_drivers_close_with_com_quit_or_abort_and_the_pool_then_closes_quietly(
    driver: str, driver_url: str, mariadb: MariaDB, caplog: pytest.LogCaptureFixture
) -> None:
    """What the shutdown does to each connection: a graceful close says COM_QUIT (the server counts nothing), an
    abort cuts the socket (the server counts one aborted client); either way the pool's own close afterwards (the
    dispose) finds it closed and logs nothing. asyncmy before 0.2.13 raised there (its close() left it 'connected')."""
    caplog.set_level(logging.WARNING)
    engine = create_async_engine(driver_url, pool_size=2)
    before = await asyncio.to_thread(mariadb.aborted)
    offset = len(mariadb.log_text())
    try:
        async with engine.connect() as a, engine.connect() as b:
            polite = (await a.get_raw_connection()).driver_connection
            cut = (await b.get_raw_connection()).driver_connection
        assert await wait_closed(polite, 2.0) is True
        abort(cut)
        assert await wait_closed(cut, 2.0) is True  # nothing left to close, nothing raised
    finally:
        await engine.dispose()
    assert await asyncio.to_thread(mariadb.wait_for_no_connections) == 0
    after = await asyncio.to_thread(mariadb.aborted)
    assert after["Aborted_clients"] - before["Aborted_clients"] == 1
    assert after["Aborted_connects"] == before["Aborted_connects"]
    assert len(mariadb.aborted_lines(offset)) == 1
    assert [r.getMessage() for r in caplog.records] == []


@pytest.mark.parametrize("driver", ["aiosqlite"])
async def test_sqlite_has_no_budget_and_says_nothing_about_one(
    caplog: pytest.LogCaptureFixture, driver_engine: Callable[..., AsyncEngine]
) -> None:
    caplog.set_level(logging.DEBUG, logger="asgi_dbpool")
    app = DBPoolMiddleware(Starlette(), driver_engine(pool_size=30, max_overflow=40), workers=64)
    async with LifespanManager(app):
        assert app.all_trackers()[0].server == {}
    said = [r.getMessage() for r in caplog.records]
    assert [line for line in said if "connection budget" in line or "server settings" in line or "pooler" in line] == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("driver", ["aiomysql", "asyncmy"])
async def test_mariadb_advice_fits_recycle_to_wait_timeout(driver_engine: Callable[..., AsyncEngine]) -> None:
    engine = driver_engine(pool_size=2, max_overflow=2, connect_args={"init_command": "SET SESSION wait_timeout=600"})
    app = DBPoolMiddleware(Starlette(), engine)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            advice: dict[str, Any] = (await client.get(PATH + "/advice")).json()["engines"]["default"]
    by_setting = {item["setting"]: item for item in advice["advice"]}
    assert by_setting["DB_POOL_RECYCLE"] == {
        "setting": "DB_POOL_RECYCLE",
        "current": -1,
        "suggested": 480,
        "why": "the server closes idle sessions after 600s (wait_timeout): recycle connections before that",
    }


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_no_pooler_is_reported_on_a_direct_postgresql_connection(
    driver_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    """The pooler check compares the process id given at connect time with pg_backend_pid(): psycopg has it too."""
    caplog.set_level(logging.INFO, logger="asgi_dbpool")
    app = DBPoolMiddleware(Starlette(), driver_engine())
    async with LifespanManager(app):
        assert app.all_trackers()[0].server["pooler"] == 0
        assert app.all_trackers()[0].server["max_connections"] == 100
    assert [r.getMessage() for r in caplog.records if "pooler" in r.getMessage()] == []


@pytest.mark.parametrize("driver", ["psycopg"])
async def test_psycopg_budget_and_recycle_advice_read_postgresql(
    driver_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_dbpool")
    engine = driver_engine(
        pool_size=30, max_overflow=40, pool_recycle=3600, connect_args={"options": "-c idle_session_timeout=600000"}
    )
    app = DBPoolMiddleware(Starlette(), engine, workers=4)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            advice: dict[str, Any] = (await client.get(PATH + "/advice")).json()["engines"]["default"]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == (
        f"connection budget exceeded on {mask_url(engine.url)}: 4 worker(s) x (30 + 40) = 280 connections > "
        "max_connections 100 - reserved 3 = 97; lower DB_POOL_SIZE / DB_MAX_OVERFLOW, raise max_connections, or "
        "put PgBouncer in front"
    )
    by_setting = {item["setting"]: item for item in advice["advice"]}
    assert by_setting["DB_POOL_RECYCLE"] == {
        "setting": "DB_POOL_RECYCLE",
        "current": 3600,
        "suggested": 480,
        "why": "the server closes idle sessions after 600s (idle_session_timeout): recycle connections before that",
    }
