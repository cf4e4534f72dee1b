"""The connection budget checked at startup against the server's max_connections, on a real PostgreSQL."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from asgi_dbpool import DBPoolMiddleware

pytestmark = pytest.mark.anyio


async def test_budget_check_warns_with_the_arithmetic(
    make_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(pool_size=30, max_overflow=40)
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    caplog.set_level(logging.WARNING, logger="asgi_dbpool")
    async with LifespanManager(DBPoolMiddleware(Starlette(), engine)):
        pass
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("connection budget exceeded on postgresql+asyncpg://postgres:***@")
    assert ": 4 worker(s) x (30 + 40) = 280 connections > max_connections 100 - reserved 3 = 97;" in line


async def test_budget_within_limits_is_silent(
    make_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_dbpool")
    async with LifespanManager(DBPoolMiddleware(Starlette(), make_engine(pool_size=5, max_overflow=5), workers=2)):
        pass
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_budget_counts_hosts_too(
    make_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="asgi_dbpool")
    async with LifespanManager(
        DBPoolMiddleware(Starlette(), make_engine(pool_size=5, max_overflow=3), workers=4, hosts=3)
    ):
        pass  # 4 x 3 x 8 = 96 <= 97: nothing to say
    assert [r.getMessage() for r in caplog.records if "connection budget" in r.getMessage()] == []
    async with LifespanManager(
        DBPoolMiddleware(Starlette(), make_engine(pool_size=5, max_overflow=4), workers=4, hosts=3)
    ):
        pass
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert ": 4 worker(s) x 3 host(s) x (5 + 4) = 108 connections > max_connections 100 - reserved 3 = 97;" in line


async def test_a_malformed_web_concurrency_fails_at_construction(
    make_engine: Callable[..., AsyncEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    from asgi_dbpool import ConfigError

    monkeypatch.setenv("WEB_CONCURRENCY", "lots")
    with pytest.raises(ConfigError, match=r"^WEB_CONCURRENCY='lots' is not a whole number; set it to an integer"):
        DBPoolMiddleware(Starlette(), make_engine())
    assert DBPoolMiddleware(Starlette(), make_engine(), workers=2).topology.workers == 2  # the option wins


LIMIT = "max_connections 100 - reserved 3 = 97"


THROUGH = "through PgBouncer ({mode} pooling) at postgresql+asyncpg://"


PGBOUNCER_BUDGET = [
    ("transaction", None, logging.INFO, f"(PgBouncer's max_client_conn must allow them); the server's limit ({LIMIT})"),
    ("transaction", 20, logging.INFO, f"client connections share PgBouncer's pool of 20 server connections <= {LIMIT}"),
    ("transaction", 150, logging.WARNING, f"share PgBouncer's pool of 150 server connections > {LIMIT}; lower"),
    ("session", 20, logging.WARNING, "client connections > PgBouncer's pool of 20: in session pooling each client"),
    ("session", 400, logging.WARNING, f"share PgBouncer's pool of 400 server connections > {LIMIT}"),
]


@pytest.mark.parametrize(("mode", "bouncer", "level", "says"), PGBOUNCER_BUDGET)
async def test_budget_through_pgbouncer_reasons_about_its_pool(
    make_engine: Callable[..., AsyncEngine],
    caplog: pytest.LogCaptureFixture,
    mode: str,
    bouncer: int | None,
    level: int,
    says: str,
) -> None:
    """Behind PgBouncer, 4 x (30 + 40) = 280 app connections are PgBouncer's clients, not the server's: no false
    alarm against max_connections; what must fit there is PgBouncer's own pool (and in session mode, the clients)."""
    engine = make_engine(pool_size=30, max_overflow=40)
    app = DBPoolMiddleware(Starlette(), engine, workers=4, pgbouncer=mode, pgbouncer_pool_size=bouncer)
    caplog.set_level(logging.INFO, logger="asgi_dbpool")
    async with LifespanManager(app):
        pass
    (record,) = [r for r in caplog.records if "connection budget" in r.getMessage()]
    line = record.getMessage()
    assert record.levelno == level
    assert THROUGH.format(mode=mode) in line
    assert ": 4 worker(s) x (30 + 40) = 280 client connections" in line
    assert says in line
