"""The ASGI surface on a SQLite file (no database server): pass-through without a lifespan, ASGI 2 apps, the
request's state, the context variable's reset, and the 503 an exhausted pool answers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from asgi_dbpool import DBPoolMiddleware

pytestmark = pytest.mark.anyio

UNHOSTED = "DBPoolMiddleware is serving a request but no lifespan is running"


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[Callable[..., AsyncEngine]]:
    engines: list[AsyncEngine] = []

    def make(**options: Any) -> AsyncEngine:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", **options)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.dispose()


async def plain(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": scope["path"].encode()})


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test")


async def test_without_a_lifespan_requests_pass_through_and_one_warning_names_the_cause(
    sqlite: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    app = DBPoolMiddleware(plain, sqlite())
    caplog.set_level(logging.WARNING, logger="asgi_dbpool")
    async with client(app) as http:
        answers = [await http.get(path) for path in ("/a", "/b", "/c")]
    async with client(plain) as http:  # control: the bare app
        bare = [await http.get(path) for path in ("/a", "/b", "/c")]
    assert [(r.status_code, r.text) for r in answers] == [(r.status_code, r.text) for r in bare]
    warnings = [r.getMessage() for r in caplog.records if r.name == "asgi_dbpool"]
    assert len(warnings) == 1
    assert warnings[0].startswith(UNHOSTED)
    assert "asgi_dbpool.litestar.DBPoolPlugin" in warnings[0]


async def test_an_asgi2_app_is_adapted_as_uvicorn_does(sqlite: Callable[..., AsyncEngine]) -> None:
    class ASGI2:
        def __init__(self, scope: dict[str, Any]) -> None:
            self.scope = scope

        async def __call__(self, receive: Any, send: Any) -> None:
            await plain(self.scope, receive, send)

    app = DBPoolMiddleware(ASGI2, sqlite())  # type: ignore[arg-type]
    async with LifespanManager(app), client(app) as http:
        response = await http.get("/two")
    assert (response.status_code, response.text) == (200, "/two")


async def test_the_request_state_carries_the_middleware_and_the_context_is_reset(
    sqlite: Callable[..., AsyncEngine],
) -> None:
    seen: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            assert (await receive())["type"] == "lifespan.startup"
            seen.append(DBPoolMiddleware.current())  # the app's own lifespan reaches the middleware
            await send({"type": "lifespan.startup.complete"})
            assert (await receive())["type"] == "lifespan.shutdown"
            await send({"type": "lifespan.shutdown.complete"})
            return
        seen.append(scope["state"]["asgi_dbpool"])
        await plain(scope, receive, send)

    wrapped = DBPoolMiddleware(app, sqlite())
    async with LifespanManager(wrapped), client(wrapped) as http:
        assert (await http.get("/")).status_code == 200
    assert seen == [wrapped, wrapped]
    with pytest.raises(RuntimeError, match="no DBPoolMiddleware lifespan is running in this context"):
        DBPoolMiddleware.current()  # reset once the lifespan ended


async def test_the_inline_record_is_the_one_inflight_start_makes(sqlite: Callable[..., AsyncEngine]) -> None:
    """The HTTP path makes each request's record inline (a call less per request); ``InFlight.start`` makes the
    same record for the WebSocket path and the floors of the benchmark. The two copies must not drift: the record
    an app sees has the class, the fields and the values ``start`` gives for the same scope and send."""
    from asgi_dbpool.asgi.request import get_request

    seen: list[tuple[Any, dict[str, Any], dict[str, Any]]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await plain(scope, receive, send)
            return
        inline = get_request()
        made = wrapped.in_flight.start(scope, inline.server_send)
        seen.append((inline, vars(inline).copy(), vars(made)))
        await plain(scope, receive, send)

    wrapped = DBPoolMiddleware(app, sqlite(), retry_after=7)
    async with LifespanManager(wrapped), client(wrapped) as http:
        assert (await http.get("/")).status_code == 200
    [(inline, fields, made)] = seen
    assert type(inline) is wrapped.in_flight
    assert inline.retry_after == 7
    assert fields == made
    assert set(fields) == {"scope", "server_send", "done", "responded", "holding"}
    assert (fields["done"], fields["responded"], fields["holding"]) == (False, False, 0)
    assert inline.done is True  # and the request ended


async def test_an_exhausted_pool_answers_503_with_retry_after(sqlite: Callable[..., AsyncEngine]) -> None:
    engine = sqlite(pool_size=1, max_overflow=0, pool_timeout=0.2)
    held = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            if scope["path"] == "/hold":
                held.set()
                await asyncio.sleep(0.6)
        await plain(scope, receive, send)

    wrapped = DBPoolMiddleware(app, engine, retry_after=7)
    async with LifespanManager(wrapped), client(wrapped) as http:
        holding = asyncio.ensure_future(http.get("/hold"))
        await held.wait()
        busy = await http.get("/busy")
        hold = await holding
    assert (hold.status_code, hold.text) == (200, "/hold")
    assert busy.status_code == 503
    assert busy.headers["retry-after"] == "7"
    assert busy.json() == {"detail": "the database connection pool is exhausted; retry later"}
    assert wrapped.all_trackers()[0].acquisition.timeouts == 1


async def test_a_leaked_session_closed_after_the_reclaim_closes_quietly(
    sqlite: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    """The shutdown closes the connection a request leaked (one WARNING); its holder closing the session later (a
    test's fixture, say) finds it invalidated: no rollback on a closed connection, nothing logged, no error."""
    engine = sqlite()
    leaked: list[AsyncSession] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        session = AsyncSession(engine)
        await session.execute(text("SELECT 1"))  # checked out, never closed
        leaked.append(session)
        await plain(scope, receive, send)

    wrapped = DBPoolMiddleware(app, engine)
    caplog.set_level(logging.WARNING)
    async with LifespanManager(wrapped), client(wrapped) as http:
        assert (await http.get("/leak")).status_code == 200
    assert [r.getMessage().split(" checked out at ")[0] for r in caplog.records] == [
        "engine 'default': closing a leaked connection"
    ]
    await leaked[0].close()  # raised OperationalError when only the pool entry was invalidated (SQLAlchemy 2.0.44)
    assert len(caplog.records) == 1
    assert wrapped.all_trackers()[0].reclaimed == 1
