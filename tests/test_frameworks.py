"""The middleware around a Litestar app, a FastAPI app (add_middleware), a Starlette app and a raw ASGI
callable: startup, a request through a session, shutdown with the leak reclaimed and nothing in the logs."""

from __future__ import annotations

import gc
import logging
import warnings
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import Request as FastAPIRequest
from litestar import Request as LitestarRequest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from asgi_dbpool import DBPoolMiddleware
from tests.conftest import backends

pytestmark = pytest.mark.anyio
leaked: list[AsyncSession] = []


def litestar_app(engine: AsyncEngine, events: list[str]) -> Any:
    from litestar import Litestar, get

    @get("/value")
    async def value(request: LitestarRequest[Any, Any, Any]) -> int:
        maker = request.scope["state"]["asgi_dbpool"].sessionmaker()
        session = maker()
        leaked.append(session)  # a session nobody closes
        return int((await session.execute(text("SELECT 42"))).scalar_one())

    async def on_startup() -> None:
        async with engine.connect() as conn:  # the middleware's startup ran first: the engine is open
            events.append(f"litestar startup {(await conn.execute(text('SELECT 1'))).scalar_one()}")

    async def on_shutdown() -> None:
        async with engine.connect() as conn:  # and its disposal comes after the app's own shutdown
            events.append(f"litestar shutdown {(await conn.execute(text('SELECT 2'))).scalar_one()}")

    # logging_config=None: Litestar would otherwise reconfigure logging (and drop the test's log capture)
    litestar = Litestar([value], on_startup=[on_startup], on_shutdown=[on_shutdown], logging_config=None)
    return DBPoolMiddleware(litestar, engine)


def fastapi_app(engine: AsyncEngine, events: list[str]) -> Any:
    from fastapi import FastAPI

    api = FastAPI()

    @api.get("/value")
    async def value(request: FastAPIRequest) -> int:
        session = request.state.asgi_dbpool.sessionmaker()()
        leaked.append(session)
        return int((await session.execute(text("SELECT 42"))).scalar_one())

    api.add_middleware(DBPoolMiddleware, engine=engine)
    return api


def starlette_app(engine: AsyncEngine, events: list[str]) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def value(request: Request) -> JSONResponse:
        session = request.state.asgi_dbpool.sessionmaker()()
        leaked.append(session)
        return JSONResponse((await session.execute(text("SELECT 42"))).scalar_one())

    return DBPoolMiddleware(Starlette(routes=[Route("/value", value)]), engine)


def raw_app(engine: AsyncEngine, events: list[str]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"  # no lifespan support at all
        session = scope["state"]["asgi_dbpool"].sessionmaker()()
        leaked.append(session)
        body = str((await session.execute(text("SELECT 42"))).scalar_one()).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})

    return DBPoolMiddleware(app, engine)


APPS = {"litestar": litestar_app, "fastapi": fastapi_app, "starlette": starlette_app, "raw": raw_app}


@pytest.mark.parametrize("kind", list(APPS))
async def test_framework(
    kind: str, make_engine: Callable[..., AsyncEngine], database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine()
    events: list[str] = []
    app = APPS[kind](engine, events)
    caplog.set_level(logging.INFO)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/value")
            assert (response.status_code, response.text) == (200, "42")
    if kind == "litestar":
        assert events == ["litestar startup 1", "litestar shutdown 2"]
    reclaimed = [r.getMessage() for r in caplog.records if "closing a leaked connection" in r.getMessage()]
    assert len(reclaimed) == 1, [r.getMessage() for r in caplog.records if r.name.startswith("asgi_dbpool")]
    assert f"{__file__}:" in reclaimed[0]
    assert await backends(database_url, make_engine.name_of(engine)) == 0  # type: ignore[attr-defined]
    caplog.clear()
    gc.collect()  # earlier garbage first (the lowest test tools leave anyio streams to it: pyproject ignores them)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", "Unclosed <MemoryObject", ResourceWarning)  # (the same, made meanwhile)
        leaked.clear()
        gc.collect()
    assert caught == []
    noisy = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.split(".")[0] in ("sqlalchemy", "asyncpg", "asyncio")
    ]
    assert noisy == []
