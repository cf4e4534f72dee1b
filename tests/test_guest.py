"""The middleware as a guest in other people's code: a cancellation that is not the server's passes through
unchanged, and the context it sets for a call is reset when the call ends (each with its bare control)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_dbpool import DBPoolMiddleware
from asgi_dbpool.pool.checkout import current_request

pytestmark = pytest.mark.anyio


def sleeping_app(engine: AsyncEngine) -> Starlette:
    async def slow(request: Request) -> PlainTextResponse:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(2)"))
        return PlainTextResponse("slept")  # pragma: no cover

    return Starlette(routes=[Route("/slow", slow)])


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "wrapped"])
async def test_a_timeout_around_a_request_reaches_the_caller(
    wrapped: bool, make_engine: Callable[..., AsyncEngine]
) -> None:
    """``asyncio.timeout(0.3)`` around a request whose endpoint sleeps 2 s in SQL: ``TimeoutError`` for the caller,
    bare and wrapped. Before: the middleware uncancelled the task and answered 503 "the server is shutting down"."""
    engine = make_engine()
    app: Any = sleeping_app(engine)
    if wrapped:
        app = DBPoolMiddleware(app, engine)
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client,
    ):
        task = asyncio.current_task()
        assert task is not None
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await client.get("/slow")
        assert task.cancelling() == 0
        if wrapped:
            assert app.lifecycle.state == "running"
    await engine.dispose()


async def test_the_request_context_is_reset_after_the_call(make_engine: Callable[..., AsyncEngine]) -> None:
    """Before: the request record stayed set in the caller's context after the call."""
    engine = make_engine()
    app = DBPoolMiddleware(Starlette(routes=[Route("/", lambda r: PlainTextResponse("ok"))]), engine)
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client,
    ):
        assert (await client.get("/")).text == "ok"
        assert current_request.get() is None


async def test_a_wrapped_sub_app_gives_the_outer_request_back(make_engine: Callable[..., AsyncEngine]) -> None:
    """A wrapped app calls a wrapped sub-app in the same task, then its own pool times out: the outer request's
    503 + Retry-After. Before: the sub-app's request stayed current, and the timeout escaped as a 500."""
    outer_engine = make_engine(pool_size=1, max_overflow=0, pool_timeout=0.2)
    inner_engine = make_engine()
    inner = DBPoolMiddleware(Starlette(routes=[Route("/", lambda r: PlainTextResponse("inner"))]), inner_engine)

    async def endpoint(request: Request) -> PlainTextResponse:
        sent: list[Any] = []

        async def collect(message: Any) -> None:
            sent.append(message)

        await inner(request.scope, request.receive, collect)  # a sub-app called in this task
        async with outer_engine.connect() as held:  # the pool's only connection
            await held.execute(text("SELECT 1"))
            async with outer_engine.connect():  # times out after 0.2 s
                pass  # pragma: no cover
        return PlainTextResponse("never")  # pragma: no cover

    outer = DBPoolMiddleware(Starlette(routes=[Route("/", endpoint)]), outer_engine, retry_after=3)
    async with (
        LifespanManager(inner),
        LifespanManager(outer) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client,
    ):
        answer = await client.get("/")
    assert (answer.status_code, answer.headers.get("retry-after")) == (503, "3")
