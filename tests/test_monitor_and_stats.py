"""The pool monitor and the stats sub-app, on real pools."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import AsyncIterator, Callable

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_dbpool import DBPoolMiddleware, PoolStatsApp
from asgi_dbpool.observe.monitor import PoolMonitor
from asgi_dbpool.pool.registry import tracker_for
from tests.conftest import asyncpg_dsn, wait_for_no_backends
from tests.helpers import PATH, server_signal_handlers

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def checked_out(engine: AsyncEngine, n: int) -> AsyncIterator[list[AsyncConnection]]:
    async with contextlib.AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(engine.connect()) for _ in range(n)]
        for conn in conns:
            await conn.execute(text("SELECT 1"))
        yield conns


def monitor_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "asgi_dbpool.monitor"]


async def test_monitor_warns_once_per_episode_and_says_when_it_clears(
    make_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(pool_size=5, max_overflow=2)
    monitor = PoolMonitor([tracker_for(engine, "main")], interval=60)
    caplog.set_level(logging.INFO, logger="asgi_dbpool.monitor")
    monitor.check()  # idle: nothing to say
    async with checked_out(engine, 4):  # 4 is not > 0.8 x 5
        monitor.check()
    async with checked_out(engine, 5):  # 5 > 0.8 x 5
        monitor.check()
        monitor.check()  # same episode: silent
        async with checked_out(engine, 1):  # 6 connections: one in overflow, same episode
            monitor.check()
    monitor.check()
    await engine.dispose()
    assert monitor_lines(caplog) == [
        (
            "WARNING",
            "pool 'main' under pressure: checked_out=5 > 0.8 x pool_size=5 (pool_size=5, checked_in=0, "
            "checked_out=5, overflow=0, invalid=0); consider raising DB_POOL_SIZE or finding slow queries and "
            "leaked sessions",
        ),
        (
            "INFO",
            "pool 'main' back to normal (pool_size=5, checked_in=5, checked_out=0, overflow=0, invalid=0)",
        ),
    ]


async def test_monitor_runs_under_the_middleware_and_stops_at_shutdown(make_engine: Callable[..., AsyncEngine]) -> None:
    app = DBPoolMiddleware(Starlette(), make_engine(), monitor_interval=0.005)
    async with LifespanManager(app):
        while app.monitor.ticks < 2:  # noqa: ASYNC110 - waiting for the monitor's own counter
            await asyncio.sleep(0.005)
        task = app.lifecycle.monitor_task
    assert task is not None
    assert task.done()
    ticks = app.monitor.ticks
    await asyncio.sleep(0.02)
    assert app.monitor.ticks == ticks


async def test_the_middleware_rejects_a_bad_monitor_interval(make_engine: Callable[..., AsyncEngine]) -> None:
    with pytest.raises(ValueError, match=r"^monitor_interval=0 is out of range; set it to a positive number up to"):
        DBPoolMiddleware(Starlette(), make_engine(), monitor_interval=0)


async def test_stats_endpoint_reports_the_pool(
    driver_engine: Callable[..., AsyncEngine], driver: str, driver_url: str
) -> None:
    engine = driver_engine(pool_size=4, max_overflow=3)
    other = driver_engine(pool_size=2, max_overflow=0)
    app = DBPoolMiddleware(Starlette(), {"main": engine, "reports": other})
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            async with checked_out(engine, 2):
                body = (await client.get(PATH)).json()
            assert body["status"] == "ok"
            assert body["default_engine"] == "main"
            assert {k: body[k] for k in ("pool_size", "checked_in", "checked_out", "overflow", "invalid")} == {
                "pool_size": 4,
                "checked_in": 0,
                "checked_out": 2,
                "overflow": 0,  # QueuePool.overflow() is -2 here; never shown negative
                "invalid": 0,
            }
            assert body["engines"]["reports"] == {
                "pool_size": 2,
                "checked_in": 1,
                "checked_out": 0,
                "overflow": 0,
                "invalid": 0,
            }
            text_body = json.dumps(body)
            for secret in ("postgres", "mysql", "sqlite", "host", driver, "/tmp", driver_url):
                assert secret not in text_body
            slash = await client.get(PATH + "/")
            assert slash.status_code == 200
            head = await client.head(PATH)
            assert (head.status_code, head.content, head.headers["content-type"]) == (200, b"", "application/json")
            post = await client.post(PATH, content=b"x")
            assert (post.status_code, post.headers["allow"]) == (405, "GET, HEAD")
            assert (await client.get(PATH + "/nope")).status_code == 404
            assert (await client.get("/elsewhere")).status_code == 404  # the app's own 404


async def test_invalid_counts_invalidations(make_engine: Callable[..., AsyncEngine], database_url: str) -> None:
    engine = make_engine(pool_size=2, pool_pre_ping=True)
    stats = PoolStatsApp(engine)
    async with engine.connect() as conn:
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    admin = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid) is True
    finally:
        await admin.close()
    # The backend is gone and the client has read its goodbye (a pre-ping racing the server's FATAL message meets
    # asyncpg mid-message: "another operation is in progress", not a disconnect; seen once in the lowest column).
    assert await wait_for_no_backends(database_url, make_engine.name_of(engine)) == 0  # type: ignore[attr-defined]
    await asyncio.sleep(0.1)
    async with engine.connect() as conn:  # pre-ping finds the dead connection and replaces it
        assert (await conn.execute(text("SELECT 5"))).scalar_one() == 5
    assert stats.figures()["invalid"] == 1
    await engine.dispose()


async def test_status_turns_to_shutting_down(make_engine: Callable[..., AsyncEngine]) -> None:
    statuses: list[str] = []
    app: DBPoolMiddleware

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        statuses.append(app.stats_app.figures()["status"])

    app = DBPoolMiddleware(Starlette(lifespan=lifespan), make_engine())
    async with LifespanManager(app):
        statuses.append(app.stats_app.figures()["status"])
    assert statuses == ["ok", "shutting_down"]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"authorization": "Bearer wrong"}, 401),
        ({"authorization": "Basic c2VjcmV0"}, 401),
        ({"authorization": "Bearer s3cret-token"}, 200),
        ({"authorization": "bearer   s3cret-token"}, 200),
    ],
)
async def test_stats_token(make_engine: Callable[..., AsyncEngine], headers: dict[str, str], status: int) -> None:
    app = DBPoolMiddleware(Starlette(), make_engine(), stats_token="s3cret-token", stats_path="/pool/")
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/pool", headers=headers)
    assert response.status_code == status
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
        assert "s3cret" not in response.text


async def test_stats_can_be_turned_off(make_engine: Callable[..., AsyncEngine]) -> None:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("app")

    app = DBPoolMiddleware(Starlette(routes=[Route(PATH, hello)]), make_engine(), stats_path=None)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get(PATH)).text == "app"


async def test_readiness_turns_503_when_shutdown_begins(make_engine: Callable[..., AsyncEngine]) -> None:
    seen: list[int] = []
    client_box: list[httpx.AsyncClient] = []

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        seen.append((await client_box[0].get(PATH + "/ready")).status_code)  # during the app's own shutdown

    app = DBPoolMiddleware(Starlette(lifespan=lifespan), make_engine())
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        client_box.append(httpx.AsyncClient(transport=transport, base_url="http://t"))
        ready = await client_box[0].get(PATH + "/ready")
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    await client_box[0].aclose()
    assert seen == [503]


async def test_readiness_turns_503_at_the_stop_signal(make_engine: Callable[..., AsyncEngine]) -> None:
    """A stop signal heard while running: the app refuses new requests (503 + Connection: close), and readiness
    says so at once, before the lifespan shutdown (uvicorn drains requests first). Before: 200 "ready" until then."""

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("app")

    app = DBPoolMiddleware(Starlette(routes=[Route("/", hello)]), make_engine())
    with server_signal_handlers():  # a server: its signal handlers, then the lifespan
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                before = [(r.status_code, r.text) for r in (await client.get("/"), await client.get(PATH + "/ready"))]
                signal.raise_signal(signal.SIGINT)
                await asyncio.sleep(0.01)  # the middleware hears of it in the loop
                refused, ready = await client.get("/"), await client.get(PATH + "/ready")
                stats = (await client.get(PATH)).json()
    assert before == [(200, "app"), (200, '{"status":"ready"}')]
    assert (refused.status_code, ready.status_code, ready.json()) == (503, 503, {"status": "shutting_down"})
    assert stats["status"] == "shutting_down"
