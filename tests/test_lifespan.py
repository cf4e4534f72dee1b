"""Lifespan interception: with and without a lifespan-aware inner app, failures, one readable line."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_dbpool import DBPoolMiddleware, StartupError, is_shutting_down
from tests.conftest import backends
from tests.helpers import LifespanDriver

pytestmark = pytest.mark.anyio


def starlette_app(events: list[str], engine: AsyncEngine) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with engine.connect() as conn:  # the app's own startup may use the database
            events.append(f"app startup {(await conn.execute(text('SELECT 1'))).scalar_one()}")
        yield
        async with engine.connect() as conn:  # ...and so may its shutdown: the engine is still open then
            events.append(f"app shutdown {(await conn.execute(text('SELECT 2'))).scalar_one()}")

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hi")

    return Starlette(routes=[Route("/", hello)], lifespan=lifespan)


async def test_lifespan_aware_app_runs_inside_the_middleware_lifecycle(make_engine: Callable[..., AsyncEngine]) -> None:
    engine = make_engine()
    events: list[str] = []
    app = DBPoolMiddleware(starlette_app(events, engine), engine)
    driver = LifespanDriver(app)
    assert await driver.startup() == {"type": "lifespan.startup.complete"}
    assert events == ["app startup 1"]
    assert driver.state["asgi_dbpool"] is app
    assert await driver.shutdown() == {"type": "lifespan.shutdown.complete"}
    assert events == ["app startup 1", "app shutdown 2"]
    assert driver.types() == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert engine.pool.checkedin() == 0  # disposed


async def raising_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http", "this app knows HTTP only"


async def returning_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    return None


@pytest.mark.parametrize("inner", [raising_app, returning_app], ids=["raises", "returns"])
async def test_lifespan_less_app_still_gets_startup_and_shutdown(
    inner: Any, make_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine()
    app = DBPoolMiddleware(inner, engine)
    driver = LifespanDriver(app)
    with caplog.at_level(logging.INFO, logger="asgi_dbpool"):
        assert await driver.startup() == {"type": "lifespan.startup.complete"}
        assert engine.pool.checkedin() == 1  # the startup check's connection, pooled
        assert await driver.shutdown() == {"type": "lifespan.shutdown.complete"}
    assert driver.types() == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert engine.pool.checkedin() == 0
    unsupported = [r.getMessage() for r in caplog.records if "does not use the lifespan protocol" in r.getMessage()]
    assert len(unsupported) == 1


async def test_inner_startup_failure_is_forwarded_and_engines_closed(
    make_engine: Callable[..., AsyncEngine], database_url: str
) -> None:
    engine = make_engine()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("cache warm-up failed")
        yield  # pragma: no cover

    app = DBPoolMiddleware(Starlette(lifespan=lifespan), engine)
    driver = LifespanDriver(app)
    answer = await driver.startup()
    with pytest.raises(RuntimeError, match=r"^cache warm-up failed$"):  # raised on, as the bare app does
        await driver.task  # type: ignore[misc]
    assert answer["type"] == "lifespan.startup.failed"
    assert "cache warm-up failed" in answer["message"]
    assert driver.types() == ["lifespan.startup.failed"]
    assert engine.pool.checkedin() == 0


async def test_inner_app_crashing_after_reading_startup_fails_startup(make_engine: Callable[..., AsyncEngine]) -> None:
    async def crashing(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        raise ValueError("bad\nconfig")

    driver = LifespanDriver(DBPoolMiddleware(crashing, make_engine()))
    assert await driver.startup() == {"type": "lifespan.startup.failed", "message": "ValueError: bad config"}
    with pytest.raises(ValueError, match=r"^bad\nconfig$"):
        await driver.task  # type: ignore[misc]
    assert driver.types() == ["lifespan.startup.failed"]


async def test_inner_shutdown_failure_is_forwarded_after_disposal(make_engine: Callable[..., AsyncEngine]) -> None:
    engine = make_engine()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        raise RuntimeError("flush failed")

    driver = LifespanDriver(DBPoolMiddleware(Starlette(lifespan=lifespan), engine))
    await driver.startup()
    with pytest.raises(RuntimeError, match=r"^flush failed$"):  # raised on after shutdown.failed
        await driver.shutdown()
    answer = driver.sent[-1]
    assert answer["type"] == "lifespan.shutdown.failed"
    assert "flush failed" in answer["message"]
    assert driver.types() == ["lifespan.startup.complete", "lifespan.shutdown.failed"]
    assert engine.pool.checkedin() == 0


@pytest.mark.parametrize(
    ("url", "cause"),
    [
        ("postgresql+asyncpg://app:s3cret@127.0.0.1:1/appdb", "ConnectionRefusedError"),
        ("postgresql+asyncpg://app:s3cret@/appdb?host=/nonexistent-dir", "No such file or directory"),
    ],
    ids=["tcp-refused", "unix-missing"],
)
async def test_unreachable_database_fails_startup_with_one_masked_line(url: str, cause: str) -> None:
    engine = create_async_engine(url)
    driver = LifespanDriver(DBPoolMiddleware(returning_app, {"primary": engine}, startup_timeout=5))
    answer = await driver.startup()
    with pytest.raises(StartupError) as raised:
        await driver.task  # type: ignore[misc]
    assert str(raised.value) == answer["message"]  # the one line, and nothing chained to it
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__
    assert driver.types() == ["lifespan.startup.failed"]
    message = answer["message"]
    assert message.startswith("asgi_dbpool: cannot reach database 'primary' at postgresql+asyncpg://app:***@")
    assert cause in message
    assert "s3cret" not in message
    assert "\n" not in message
    await engine.dispose()


async def test_wrong_password_names_the_cause(database_url: str) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(database_url).set(username="nobody_here", password="hunter2")
    engine = create_async_engine(url)
    driver = LifespanDriver(DBPoolMiddleware(returning_app, engine))
    answer = await driver.startup()
    assert answer["type"] == "lifespan.startup.failed"
    assert "'default'" in answer["message"]
    assert "nobody_here" in answer["message"]
    assert "hunter2" not in answer["message"]
    await engine.dispose()


async def test_request_handlers_read_the_flag_through_lifespan_state(make_engine: Callable[..., AsyncEngine]) -> None:
    seen: list[Any] = []

    async def flag(request: Request) -> PlainTextResponse:
        mw = request.state.asgi_dbpool
        seen.append((mw.shutting_down, is_shutting_down()))
        return PlainTextResponse("ok")

    app = DBPoolMiddleware(Starlette(routes=[Route("/flag", flag)]), make_engine())
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client,
    ):
        assert (await client.get("/flag")).text == "ok"
    assert seen == [(False, False)]
    assert app.shutting_down is True
    assert is_shutting_down() is True


async def test_backends_are_gone_after_the_lifespan(make_engine: Callable[..., AsyncEngine], database_url: str) -> None:
    engine = make_engine(pool_size=3)
    app = DBPoolMiddleware(returning_app, engine)
    async with LifespanManager(app):
        async with engine.connect() as a, engine.connect() as b:
            await a.execute(text("SELECT 1"))
            await b.execute(text("SELECT 1"))
        assert await backends(database_url, make_engine.name_of(engine)) == 2  # type: ignore[attr-defined]
    assert await backends(database_url, make_engine.name_of(engine)) == 0  # type: ignore[attr-defined]


async def test_a_second_running_middleware_on_one_engine_is_refused(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    """Pool options live per engine, and shutdown disposes the engine: two running owners would override each
    other's options and one would close the engine under the other. The second one's startup fails instead."""
    engine = make_engine()
    first = DBPoolMiddleware(Starlette(), engine, leak_threshold=5)
    tracker = first.all_trackers()[0]
    expected = (
        "asgi_dbpool: engine 'default' at postgresql+asyncpg://postgres:***@/postgres?host=",
        " is already managed by another running DBPoolMiddleware; wrap the app once (one middleware per engine) "
        "or give each app its own engine",
    )
    async with LifespanManager(first):
        second = DBPoolMiddleware(Starlette(), engine, max_pending=3)
        assert (tracker.leak_threshold, tracker.acquisition.max_pending) == (
            5,
            None,
        )  # the running owner's options stay
        driver = LifespanDriver(second)
        answer = await driver.startup()
        with pytest.raises(StartupError, match="already managed by another running DBPoolMiddleware"):
            await driver.task  # type: ignore[misc]
        assert driver.types() == ["lifespan.startup.failed"]
        assert answer["message"].startswith(expected[0])
        assert answer["message"].endswith(expected[1])
        async with engine.connect() as conn:  # the first app's engine was left alone
            assert (await conn.execute(text("SELECT 5"))).scalar_one() == 5
        nested = DBPoolMiddleware(DBPoolMiddleware(Starlette(), engine), engine)
    # Sequentially, one after the other, is fine: a restarted app takes the engine over with its options.
    async with LifespanManager(second):
        assert (tracker.leak_threshold, tracker.acquisition.max_pending) == (None, 3)
    # Wrapping twice: the inner middleware's startup fails, and the outer forwards it.
    driver = LifespanDriver(nested)
    answer = await driver.startup()
    with pytest.raises(StartupError, match="already managed by another running DBPoolMiddleware"):
        await driver.task  # type: ignore[misc]
    assert driver.types() == ["lifespan.startup.failed"]
    assert answer["message"].endswith(expected[1])
    assert engine.pool.checkedin() == 0  # the outer one closed what it had opened


def disposing_app(events: list[str], engine: AsyncEngine) -> Starlette:
    """The common FastAPI/Starlette pattern: the lifespan disposes the engine as it exits; here its shutdown then
    still uses the database (as a later hook, or a plugin's lifespan, may)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        yield
        await engine.dispose()
        events.append("app disposed the engine")
        async with engine.connect() as conn:
            events.append(f"app shutdown {(await conn.execute(text('SELECT 2'))).scalar_one()}")

    return Starlette(lifespan=lifespan)


@pytest.mark.parametrize("wrapped", [True, False], ids=["wrapped", "bare"])
async def test_an_engine_dispose_in_the_apps_shutdown_waits_for_the_last_step(
    wrapped: bool, make_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    """Wrapped: the app's ``engine.dispose()`` leaves the pool as it is (one INFO line says so); the app's shutdown
    code after it uses the connection it used before; the pool is closed once, by our last step. Bare (control): the
    dispose closes that connection, and the shutdown code opens another."""
    engine = make_engine()
    events: list[str] = []
    started = False

    @event.listens_for(engine.sync_engine, "connect")
    def connected(*_: Any) -> None:
        if started:
            events.append("connection opened")

    @event.listens_for(engine.sync_engine, "close")
    def closed(*_: Any) -> None:
        events.append("connection closed")

    app: Any = disposing_app(events, engine)
    if wrapped:
        app = DBPoolMiddleware(app, engine)
    caplog.set_level(logging.INFO, logger="asgi_dbpool")
    async with LifespanManager(app):
        started = True
    deferred = [r.getMessage() for r in caplog.records if r.__dict__.get("step") == "dispose_deferred"]
    if wrapped:
        assert events == ["app disposed the engine", "app shutdown 2", "connection closed"]
        assert deferred == [
            "engine 'default': engine.dispose() during the app's shutdown is deferred to the shutdown's last step "
            "(the app's remaining shutdown code may still use the engine)"
        ]
        async with LifespanManager(app):  # a second run: engine.dispose() in its shutdown is deferred again
            pass
        assert events[3:] == ["connection opened", "app disposed the engine", "app shutdown 2", "connection closed"]
        # After the shutdown (checkouts are refused until the next start), engine.dispose() disposes at once again.
        assert [tracker.disposal_deferred for tracker in app.lifecycle.all_trackers] == [False]
    else:
        assert events == ["connection closed", "app disposed the engine", "connection opened", "app shutdown 2"]
        assert deferred == []
        await engine.dispose()
        assert events[-1] == "connection closed"
