"""Overload: an exhausted pool answers 503 + Retry-After, for raw ASGI, Starlette and FastAPI apps."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Annotated, Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_dbpool import DBPoolMiddleware
from asgi_dbpool.starlette import get_session

pytestmark = pytest.mark.anyio
HOLD = 0.4  # seconds each request holds its connection, after one query (every driver: SQLite has no sleep)
#: Every app kind on asyncpg; the Starlette app on every driver.
KINDS_AND_DRIVERS = [(kind, "asyncpg") for kind in ("raw", "starlette", "fastapi")] + [
    ("starlette", driver) for driver in ("psycopg", "aiomysql", "asyncmy", "aiosqlite")
]


async def hold(session: AsyncSession) -> None:
    await session.execute(text("SELECT 1"))
    await asyncio.sleep(HOLD)


def raw_app(engine: AsyncEngine) -> Any:
    maker = async_sessionmaker(engine)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        async with maker() as session:
            await hold(session)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def starlette_app(engine: AsyncEngine) -> Any:
    maker = async_sessionmaker(engine)

    async def endpoint(request: Request) -> PlainTextResponse:
        async with maker() as session:
            await hold(session)
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/", endpoint)])


def fastapi_app(engine: AsyncEngine) -> Any:
    api = FastAPI()

    @api.get("/")
    async def endpoint(session: Annotated[AsyncSession, Depends(get_session)]) -> str:
        await hold(session)
        return "ok"

    return api


APPS = {"raw": raw_app, "starlette": starlette_app, "fastapi": fastapi_app}


async def burst(app: Any, n: int = 20, lifespan: bool = True) -> list[httpx.Response]:
    async with contextlib.AsyncExitStack() as stack:
        if lifespan:
            app = (await stack.enter_async_context(LifespanManager(app))).app
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30)
        )
        return await asyncio.gather(*(client.get("/") for _ in range(n)))


@pytest.mark.parametrize(("kind", "driver"), KINDS_AND_DRIVERS)
async def test_pool_timeout_becomes_503_with_retry_after(
    kind: str, driver_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    engine = driver_engine(pool_size=2, max_overflow=0, pool_timeout=0.2)
    inner = APPS[kind](engine)
    app = DBPoolMiddleware(inner, engine, retry_after=3)
    caplog.set_level(logging.INFO, logger="asgi_dbpool")
    responses = await burst(app)
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, statuses
    assert statuses.count(200) >= 2
    for response in responses:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "3"
            assert response.json() == {"detail": "the database connection pool is exhausted; retry later"}
    tracker = app.all_trackers()[0]
    assert tracker.acquisition.timeouts == statuses.count(503)
    assert tracker.overload_answers == statuses.count(503)
    exhausted = [r.getMessage() for r in caplog.records if "pool exhausted" in r.getMessage()]
    assert len(exhausted) == 1  # one WARNING per episode
    assert exhausted[0].startswith("engine 'default': pool exhausted (pool_size=2, checked_out=2,")
    assert any("pool no longer exhausted" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("kind", "driver"), KINDS_AND_DRIVERS)
async def test_control_without_the_middleware_answers_500(kind: str, driver_engine: Callable[..., AsyncEngine]) -> None:
    engine = driver_engine(pool_size=2, max_overflow=0, pool_timeout=0.2)
    responses = await burst(APPS[kind](engine), lifespan=kind != "raw")  # the raw app speaks no lifespan
    await engine.dispose()
    assert 500 in {r.status_code for r in responses}


async def test_max_pending_fails_fast(make_engine: Callable[..., AsyncEngine]) -> None:
    engine = make_engine(pool_size=2, max_overflow=0, pool_timeout=5)
    app = DBPoolMiddleware(starlette_app(engine), engine, max_pending=2)
    responses = await burst(app)
    statuses = [r.status_code for r in responses]
    tracker = app.all_trackers()[0]
    # 2 hold connections; while 2 are pending (waiting, or opening the second connection) the rest are refused
    # at once: nobody waits out the 5 s timeout
    assert tracker.acquisition.timeouts == 0
    assert statuses.count(200) in (3, 4)
    assert tracker.acquisition.rejected == statuses.count(503) == 20 - statuses.count(200)
    assert tracker.acquisition.wait.count == 1 + 1 + statuses.count(
        200
    )  # startup ping, server read, and each request served
