"""Holder and leak reports name the request (``METHOD /route``) and the first user frames of the checkout, also
behind a ``BaseHTTPMiddleware`` (where every task is ``call_next``'s) and through a shared helper."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI, Request, Response
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.middleware.base import BaseHTTPMiddleware

from asgi_dbpool import DBPoolMiddleware

pytestmark = pytest.mark.anyio


async def fetch_one(session: AsyncSession) -> None:  # a shared helper: the innermost user frame of the checkout
    await session.execute(text("SELECT 1"))


class Passthrough(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        return await call_next(request)


async def test_leak_and_holder_reports_name_the_request_and_the_callers(
    make_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine()
    maker = async_sessionmaker(engine)
    leaked: list[AsyncSession] = []
    holding = asyncio.Event()
    api = FastAPI()
    api.add_middleware(Passthrough)

    @api.get("/items/{item_id}")
    async def leak(item_id: int) -> dict[str, int]:
        session = maker()
        await fetch_one(session)  # LEAK LINE
        leaked.append(session)
        return {"id": item_id}

    @api.get("/slow")
    async def slow() -> dict[str, bool]:
        async with maker() as session:
            await session.execute(text("SELECT 1"))
            holding.set()
            await asyncio.sleep(30)
        return {"done": True}  # pragma: no cover

    leak_line = inspect.getsource(leak).splitlines().index("        await fetch_one(session)  # LEAK LINE")
    call_line = leak.__code__.co_firstlineno + leak_line  # co_firstlineno is the decorator's line
    app = DBPoolMiddleware(api, engine, shutdown_timeout=3)
    caplog.set_level(logging.INFO, logger="asgi_dbpool")
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        assert (await client.get("/items/7")).json() == {"id": 7}
        stuck = asyncio.create_task(client.get("/slow"))
        await holding.wait()
    stuck.cancel()
    messages = [r.getMessage() for r in caplog.records]
    leaks = [m for m in messages if "closing a leaked connection" in m]
    assert len(leaks) == 1
    assert f"checked out at {__file__}:" in leaks[0]  # the helper, innermost
    assert f"(called from {__file__}:{call_line}" in leaks[0]  # ...then the endpoint that called it
    assert leaks[0].endswith("during GET /items/{item_id}")
    holders = [m for m in messages if m.startswith("cancelling ")]
    assert len(holders) == 1
    assert "serving GET /slow" in holders[0]
