"""``asgi_dbpool.starlette``: the session dependency (FastAPI and Starlette) and the legacy sync layer."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Annotated

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_dbpool import DBPoolMiddleware
from asgi_dbpool.starlette import get_session, legacy_sessionmaker, session_scope
from tests.conftest import wait_for_no_backends

pytestmark = pytest.mark.anyio


async def prepare(engine: AsyncEngine, table: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        await conn.execute(text(f"CREATE TABLE {table} (id serial PRIMARY KEY, name text NOT NULL)"))


async def test_fastapi_depends_get_session(make_engine: Callable[..., AsyncEngine]) -> None:
    engine = make_engine()
    await prepare(engine, "fa_items")
    api = FastAPI()

    @api.post("/items/{name}")
    async def create(name: str, session: Annotated[AsyncSession, Depends(get_session)]) -> dict[str, int]:
        row = (await session.execute(text("INSERT INTO fa_items (name) VALUES (:n) RETURNING id"), {"n": name})).one()
        if name == "bad":
            raise HTTPException(status_code=422, detail="rejected after the insert")
        await session.commit()
        return {"id": row.id}

    @api.get("/items")
    async def listing(session: Annotated[AsyncSession, Depends(get_session)]) -> list[str]:
        return list((await session.execute(text("SELECT name FROM fa_items ORDER BY id"))).scalars())

    api.add_middleware(DBPoolMiddleware, engine=engine)
    async with LifespanManager(api) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.post("/items/a")).json() == {"id": 1}
            assert (await client.post("/items/bad")).status_code == 422  # rolled back
            assert (await client.post("/items/b")).json() == {"id": 3}
            assert (await client.get("/items")).json() == ["a", "b"]
            stats = (await client.get("/api/system/database/pool")).json()
            assert stats["checked_out"] == 0  # every session was closed


async def test_starlette_session_scope(make_engine: Callable[..., AsyncEngine]) -> None:
    engine = make_engine()

    async def value(request: Request) -> JSONResponse:
        async with session_scope(request) as session:
            return JSONResponse((await session.execute(text("SELECT 40 + 2"))).scalar_one())

    app = DBPoolMiddleware(Starlette(routes=[Route("/", value)]), engine)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/")).json() == 42
            assert app.stats_app.figures()["checked_out"] == 0


async def test_get_session_without_the_middleware_says_what_to_do() -> None:
    async def value(request: Request) -> JSONResponse:
        async with session_scope(request):
            return JSONResponse(1)  # pragma: no cover

    app = Starlette(routes=[Route("/", value)])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(RuntimeError, match="no DBPoolMiddleware in this request's state"):
            await client.get("/")


async def test_legacy_sync_engine_warns_and_is_disposed(
    make_engine: Callable[..., AsyncEngine], database_url: str
) -> None:
    engine = make_engine()
    sync_url = make_url(database_url).set(drivername="postgresql+psycopg2")
    sync_engine = create_engine(sync_url, connect_args={"application_name": "legacy_sync_test"})
    SessionLocal = legacy_sessionmaker(sync_engine)
    leaked = []

    def legacy_query() -> int:
        with pytest.warns(DeprecationWarning, match="The sync SessionLocal is deprecated"):
            session = SessionLocal()
        leaked.append(session)  # a legacy route that never closes its session
        return int(session.execute(text("SELECT 9")).scalar_one())

    app = DBPoolMiddleware(Starlette(), engine, sync_engines=[sync_engine])
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client,
    ):
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(legacy_query()))
        thread.start()
        thread.join()
        assert result == [9]
        # The sync engine is in the pool figures and metrics, by its name, holding the leaked session's connection.
        figures = (await client.get("/api/system/database/pool")).json()
        metrics = (await client.get("/api/system/database/pool/metrics")).text
    assert list(figures["engines"]) == ["default", "sync:0"]
    assert (figures["default_engine"], figures["checked_out"]) == ("default", 0)  # the top level: the default's
    assert figures["engines"]["sync:0"]["checked_out"] == 1
    assert 'db_client_connection_count{pool_name="sync:0",state="used"} 1.0' in metrics
    assert await wait_for_no_backends(database_url, "legacy_sync_test") == 0
