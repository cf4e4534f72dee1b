"""One owner for the lifecycle: every failure path answers once and leaves nothing running or open.

Each test here failed on the code before :class:`asgi_dbpool.lifecycle.lifecycle.Lifecycle` (issue 14, items a-h); the
uvicorn ``--lifespan on`` force exit (d) and hypercorn's database-down traceback (c) are checked with real
servers in ``test_servers.py`` and ``test_faults.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_dbpool import ConfigError, DBPoolMiddleware, PoolSettings, StartupError, is_shutting_down
from asgi_dbpool.pool.registry import all_trackers
from tests.conftest import backends
from tests.helpers import LifespanDriver, cut_off_post, server_signal_handlers

pytestmark = pytest.mark.anyio


def our_tasks() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("asgi_dbpool"))


async def test_a_failed_inner_startup_leaves_no_task_running(
    make_engine: Callable[..., AsyncEngine], database_url: str
) -> None:
    """(a) The monitor and leak detection started before the app's own startup failed: both are stopped."""
    engine = make_engine()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        raise RuntimeError("cache warm-up failed")
        yield  # pragma: no cover

    app = DBPoolMiddleware(Starlette(lifespan=lifespan), engine, leak_threshold=30)
    driver = LifespanDriver(app)
    answer = await driver.startup()
    with pytest.raises(RuntimeError, match=r"^cache warm-up failed$"):
        await driver.task  # type: ignore[misc]
    assert answer["type"] == "lifespan.startup.failed"
    assert answer["message"].endswith("RuntimeError: cache warm-up failed\n")  # Starlette's message, forwarded
    assert driver.types() == ["lifespan.startup.failed"]
    assert our_tasks() == []
    assert (engine.pool.checkedin(), engine.pool.checkedout()) == (0, 0)
    assert await backends(database_url, make_engine.name_of(engine)) == 0  # type: ignore[attr-defined]


async def test_any_exception_in_our_startup_answers_failed_once_and_closes_everything(
    make_engine: Callable[..., AsyncEngine],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """(b) Not only StartupError: a bug or an odd server answers ``startup.failed`` in one line, engines closed."""
    from asgi_dbpool.lifecycle import startup as _startup

    def odd_server(*args: Any) -> list[tuple[int, str]]:
        raise KeyError("max_connections")

    monkeypatch.setattr(_startup, "budget_lines", odd_server)  # the budget check meets a server it cannot read
    engine = make_engine()
    caplog.set_level(logging.INFO, logger="asgi_dbpool")
    app = DBPoolMiddleware(Starlette(), engine, leak_threshold=30)
    driver = LifespanDriver(app)
    answer = await driver.startup()
    with pytest.raises(StartupError) as raised:
        await driver.task  # type: ignore[misc]
    assert answer == {
        "type": "lifespan.startup.failed",
        "message": "asgi_dbpool: startup failed: KeyError: 'max_connections'",
    }
    assert (str(raised.value), raised.value.__cause__, raised.value.__context__) == (answer["message"], None, None)
    assert driver.types() == ["lifespan.startup.failed"]
    assert our_tasks() == []
    assert engine.pool.checkedin() == 0
    assert await backends(database_url, make_engine.name_of(engine)) == 0  # type: ignore[attr-defined]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [(r.getMessage(), type(r.exc_info[1]).__name__ if r.exc_info else None) for r in errors] == [
        ("startup failed", "KeyError")  # the traceback goes to our log, once
    ]


async def cancel_during_startup(app: DBPoolMiddleware, in_startup: asyncio.Event) -> LifespanDriver:
    """Start ``app``'s lifespan as a server would, cancel its task once ``in_startup`` is set, and check that the
    cancellation propagates out of it."""
    driver = LifespanDriver(app)
    asking = asyncio.ensure_future(driver.startup())
    await in_startup.wait()
    assert driver.task is not None
    driver.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await driver.task
    asking.cancel()
    return driver


async def test_a_cancelled_startup_closes_what_it_opened(make_engine: Callable[..., AsyncEngine]) -> None:
    """A server cancelling the lifespan during the app's own startup: everything closed, then the cancellation
    propagates (asgi-lifespan's startup_timeout, a task group); the app can start again."""
    engine = make_engine()
    in_startup = asyncio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        in_startup.set()
        await asyncio.Event().wait()
        yield  # pragma: no cover

    app = DBPoolMiddleware(Starlette(lifespan=lifespan), engine, leak_threshold=30)
    driver = await cancel_during_startup(app, in_startup)
    assert driver.types() == []  # the server asked for the cancellation: no answer is owed
    assert our_tasks() == []
    assert engine.pool.checkedin() == 0
    assert app.lifecycle.state == "stopped"


async def test_a_cancelled_startup_leaves_no_backend_and_can_start_again(
    make_engine: Callable[..., AsyncEngine], database_url: str
) -> None:
    """The same cancellation with the app's startup holding a connection of its own (and ours pooled from the
    startup check): no backend is left, and the app starts and serves again with the same middleware."""
    engine = make_engine()
    runs: list[int] = []
    in_startup = asyncio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        runs.append(len(runs))
        if runs == [0]:  # the first run's startup only: it hangs in a query
            async with engine.connect() as conn:
                in_startup.set()
                await conn.execute(text("SELECT pg_sleep(30)"))
        yield

    async def hello(request: Request) -> PlainTextResponse:
        async with engine.connect() as conn:
            return PlainTextResponse(str((await conn.execute(text("SELECT 7"))).scalar_one()))

    app = DBPoolMiddleware(Starlette(routes=[Route("/", hello)], lifespan=lifespan), engine)
    await cancel_during_startup(app, in_startup)
    assert (our_tasks(), app.lifecycle.state) == ([], "stopped")
    assert await backends(database_url, make_engine.name_of(engine)) == 0  # type: ignore[attr-defined]
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/")).text == "7"
    assert runs == [0, 1]


async def test_one_app_starting_does_not_clear_another_apps_shutdown(make_engine: Callable[..., AsyncEngine]) -> None:
    """(e) The process-wide flag holds while any app is shutting down; each app's own truth is per app."""
    release = asyncio.Event()
    in_shutdown = asyncio.Event()

    @contextlib.asynccontextmanager
    async def slow_shutdown(app: Starlette) -> AsyncIterator[None]:
        yield
        in_shutdown.set()
        await release.wait()

    first = DBPoolMiddleware(Starlette(lifespan=slow_shutdown), make_engine(), shutdown_timeout=30)
    second = DBPoolMiddleware(Starlette(), make_engine())
    first_driver, second_driver = LifespanDriver(first), LifespanDriver(second)
    await first_driver.startup()
    assert is_shutting_down() is False
    stopping = asyncio.ensure_future(first_driver.shutdown())
    await in_shutdown.wait()
    assert is_shutting_down() is True
    assert (await second_driver.startup())["type"] == "lifespan.startup.complete"
    seen = (is_shutting_down(), first.shutting_down, second.shutting_down)
    release.set()
    assert (await stopping)["type"] == "lifespan.shutdown.complete"
    after_first = (is_shutting_down(), first.shutting_down, second.shutting_down)
    await second_driver.shutdown()
    assert seen == (True, True, False)
    assert after_first == (False, True, False)  # the second app is running: its errors are real
    assert is_shutting_down() is True  # the last running app shut down: leftovers are judged by the flag


# (f) One set of rules: the middleware's keyword arguments and PoolSettings give the same ConfigError.
SHARED_OPTIONS = [
    ("leak_threshold", -1, "leak_threshold=-1 is out of range; set it to 0 (off) up to 604800 seconds."),
    ("retry_after", 3601, "retry_after=3601 is out of range; set it to an integer from 0 to 3600."),
    ("retry_after", 1.5, "retry_after=1.5 is not a whole number; set it to an integer from 0 to 3600."),
    ("max_pending", -2, "max_pending=-2 is out of range; set it to an integer from 0 to 10000."),
    ("workers", 1001, "workers=1001 is out of range; set it to an integer from 0 to 1000."),
    ("hosts", 0, "hosts=0 is out of range; set it to an integer from 1 to 1000."),
    (
        "pgbouncer",
        "statement",
        "pgbouncer='statement' is not a PgBouncer pooling mode; use off, session or transaction.",
    ),
    (
        "pgbouncer_pool_size",
        True,
        "pgbouncer_pool_size=True is not a whole number; set it to an integer from 0 to 10000.",
    ),
]


@pytest.mark.parametrize(("option", "value", "message"), SHARED_OPTIONS)
async def test_options_have_one_rule_and_one_wording(
    option: str, value: object, message: str, make_engine: Callable[..., AsyncEngine]
) -> None:
    with pytest.raises(ConfigError) as from_settings:
        PoolSettings(**{option: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as from_middleware:
        DBPoolMiddleware(Starlette(), make_engine(), **{option: value})
    assert str(from_settings.value) == str(from_middleware.value) == message
    assert isinstance(from_middleware.value, ValueError)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        (
            "monitor_interval",
            0,
            "monitor_interval=0 is out of range; set it to a positive number up to 604800 seconds.",
        ),
        (
            "shutdown_timeout",
            -1,
            "shutdown_timeout=-1 is out of range; set it to a positive number up to 604800 seconds.",
        ),
        ("startup_timeout", float("inf"), "startup_timeout=inf is out of range; set it to a positive number up to"),
        ("stats_path", "pool", "stats_path='pool' must start with '/' and not be '/'; or pass None"),
        ("stats_token", "", "stats_token='' is empty; set a secret, or pass None"),
    ],
)
async def test_middleware_only_options_are_checked_the_same_way(
    option: str, value: object, message: str, make_engine: Callable[..., AsyncEngine]
) -> None:
    with pytest.raises(ConfigError) as info:
        DBPoolMiddleware(Starlette(), make_engine(), **{option: value})
    assert str(info.value).startswith(message)


async def test_a_cancelled_request_gets_the_configured_retry_after(make_engine: Callable[..., AsyncEngine]) -> None:
    """(h)"""
    engine = make_engine()
    maker = async_sessionmaker(engine)
    in_query = asyncio.Event()

    async def slow(request: Request) -> PlainTextResponse:
        async with maker() as session:
            in_query.set()
            await session.execute(text("SELECT pg_sleep(30)"))
        return PlainTextResponse("never")  # pragma: no cover

    app = DBPoolMiddleware(Starlette(routes=[Route("/", slow, methods=["POST"])]), engine, retry_after=17)
    with server_signal_handlers():  # a server: its signal handlers, then the lifespan
        async with LifespanManager(app):
            sent = await cut_off_post(app, in_query)
    assert sent[0]["status"] == 503
    assert (b"retry-after", b"17") in sent[0]["headers"]


@pytest.mark.parametrize(
    ("environ", "warned"),
    [
        ({"ENVIRONMENT": "prod"}, True),
        ({"ENVIRONMENT": "production", "DB_POOL_STATS_TOKEN": "t"}, False),
        ({"ENVIRONMENT": "production", "DB_POOL_STATS_PATH": "off"}, False),
        ({"ENVIRONMENT": "development"}, False),
    ],
)
async def test_public_pool_endpoints_in_production_get_one_warning(
    environ: dict[str, str], warned: bool, make_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    settings = PoolSettings.from_env(environ)
    options = settings.middleware_options()
    options.pop("workers", None)
    app = DBPoolMiddleware(Starlette(), make_engine(pool_size=2, max_overflow=0), **options)
    caplog.set_level(logging.WARNING, logger="asgi_dbpool")
    async with LifespanManager(app):
        pass
    public = [r for r in caplog.records if getattr(r, "step", None) == "public_endpoints"]
    assert [r.getMessage() for r in public] == (
        [
            "the pool endpoints at /api/system/database/pool (figures, metrics, advice) answer anyone: set "
            "DB_POOL_STATS_TOKEN (stats_token=) to require a bearer token, or DB_POOL_STATS_PATH=off (stats_path=None)"
        ]
        if warned
        else []
    )


async def test_add_middleware_applies_every_setting_and_the_lifespan_reaches_the_middleware(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    """FastAPI's ``add_middleware`` with ``**settings.middleware_options()``; ``DBPoolMiddleware.current()`` in
    the app's own lifespan registers a task and uses the sessionmaker."""
    from fastapi import FastAPI

    engine = make_engine()
    seen: list[object] = []

    async def worker() -> None:
        await asyncio.Event().wait()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        middleware = DBPoolMiddleware.current()
        seen.append(middleware.register_task(asyncio.create_task(worker(), name="app worker")))
        async with middleware.sessionmaker()() as session:
            seen.append((await session.execute(text("SELECT 3"))).scalar_one())
        yield

    settings = PoolSettings.from_env({"DB_POOL_LEAK_THRESHOLD": "7", "DB_POOL_RETRY_AFTER": "9"})
    api = FastAPI(lifespan=lifespan)
    api.add_middleware(DBPoolMiddleware, engine=engine, **settings.middleware_options())
    async with LifespanManager(api):
        tracker = next(t for t in all_trackers() if t.engine is engine.sync_engine)
        assert (tracker.leak_threshold, tracker.acquisition.max_pending) == (7.0, None)  # DB_POOL_LEAK_THRESHOLD
    task, value = seen
    assert value == 3
    assert isinstance(task, asyncio.Task)
    assert task.cancelled()  # registered: cancelled by the shutdown before the app's own shutdown
    with pytest.raises(RuntimeError, match="no DBPoolMiddleware lifespan is running in this context"):
        DBPoolMiddleware.current()
