"""Metrics, leak detection, readiness, advice and the connection budget, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from asgi_dbpool import DBPoolMiddleware
from asgi_dbpool.__main__ import format_advice
from tests.conftest import asyncpg_dsn, wait_for_no_backends

pytestmark = pytest.mark.anyio
PATH = "/api/system/database/pool"


def samples(metrics_text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, keyed by name and sorted labels, as prometheus_client's own parser reads them."""
    out = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client


async def test_metrics_count_waits_timeouts_uses_and_creations(driver_engine: Callable[..., AsyncEngine]) -> None:
    engine = driver_engine(pool_size=2, max_overflow=0, pool_timeout=0.2)
    app = DBPoolMiddleware(Starlette(), {"main": engine})
    async with serving(app) as client:  # startup: one connection created, used once
        async with engine.connect() as a, engine.connect() as b:
            await a.execute(text("SELECT 1"))
            await b.execute(text("SELECT 1"))
            with pytest.raises(sa_exc.TimeoutError):
                async with engine.connect():
                    pass  # pragma: no cover
            during = samples((await client.get(PATH + "/metrics")).text)
        after = samples((await client.get(PATH + "/metrics")).text)
        response = await client.get(PATH + "/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    main = (("pool_name", "main"),)
    assert during[("db_client_connection_count", (*main, ("state", "used")))] == 2
    assert during[("db_client_connection_count", (*main, ("state", "idle")))] == 0
    assert after[("db_client_connection_count", (*main, ("state", "idle")))] == 2
    assert after[("db_client_connection_max", main)] == 2
    assert after[("db_client_connection_idle_max", main)] == 2
    assert after[("db_client_connection_pending_requests", main)] == 0
    assert after[("db_client_connection_timeouts_total", main)] == 1
    assert after[("asgi_dbpool_checked_out_high_water", main)] == 2
    # the startup ping, the startup read of the server settings, a and b got connections (the timed-out one not)
    assert after[("db_client_connection_wait_time_seconds_count", main)] == 4
    assert after[("db_client_connection_use_time_seconds_count", main)] == 4
    assert after[("db_client_connection_create_time_seconds_count", main)] == 2  # a reused the startup one
    assert after[("db_client_connection_wait_time_seconds_bucket", (("le", "+Inf"), *main))] == 4
    assert after[("db_client_connection_wait_time_seconds_sum", main)] > 0


async def test_invalidations_show_in_metrics(make_engine: Callable[..., AsyncEngine], database_url: str) -> None:
    engine = make_engine(pool_size=1, pool_pre_ping=True)
    app = DBPoolMiddleware(Starlette(), engine)
    async with serving(app) as client:
        async with engine.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        admin = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        # The backend is gone and the client has read its goodbye (a pre-ping racing the server's FATAL message
        # meets asyncpg mid-message: "another operation is in progress", not a disconnect).
        assert await wait_for_no_backends(database_url, make_engine.name_of(engine)) == 0  # type: ignore[attr-defined]
        await asyncio.sleep(0.1)
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))  # pre-ping finds it dead
        metrics = samples((await client.get(PATH + "/metrics")).text)
    assert metrics[("asgi_dbpool_invalidations_total", (("pool_name", "default"),))] == 1


async def test_leak_detection_warns_with_the_stack_and_reports_the_return(
    driver_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    engine = driver_engine()
    app = DBPoolMiddleware(Starlette(), engine, leak_threshold=0.1)
    caplog.set_level(logging.INFO, logger="asgi_dbpool")

    async def slow_report() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            while not app.all_trackers()[0].leaks:  # noqa: ASYNC110 - held until the leak is reported
                await asyncio.sleep(0.02)

    async with serving(app) as client:
        await slow_report()
        metrics = samples((await client.get(PATH + "/metrics")).text)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("engine 'default': connection held for ")
    assert "(leak threshold 0.1s), checked out at:" in warnings[0]
    assert f"{__file__}:" in warnings[0]
    assert " in slow_report" in warnings[0]
    assert f" in {test_leak_detection_warns_with_the_stack_and_reports_the_return.__name__}" in warnings[0]
    returned = [r.getMessage() for r in caplog.records if "came back after" in r.getMessage()]
    assert len(returned) == 1
    assert returned[0].startswith(f"engine 'default': the connection checked out at {__file__}:")
    assert metrics[("asgi_dbpool_leaks_total", (("pool_name", "default"),))] == 1


async def test_no_stacks_are_captured_without_leak_detection(make_engine: Callable[..., AsyncEngine]) -> None:
    engine = make_engine()
    app = DBPoolMiddleware(Starlette(), engine)
    async with LifespanManager(app), engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        (checkout,) = app.all_trackers()[0].checkouts.values()
        assert checkout.stack is None
        assert checkout.site.startswith(f"{__file__}:")


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


async def test_advice_grows_a_pool_that_timed_out(make_engine: Callable[..., AsyncEngine]) -> None:
    engine = make_engine(pool_size=1, max_overflow=0, pool_timeout=0.1)
    app = DBPoolMiddleware(Starlette(), engine)
    async with serving(app) as client:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            with pytest.raises(sa_exc.TimeoutError):
                async with engine.connect():
                    pass  # pragma: no cover
        advice = (await client.get(PATH + "/advice")).json()["engines"]["default"]
    assert advice["observed"]["timeouts"] == 1
    assert advice["advice"][0] == {
        "setting": "DB_POOL_SIZE",
        "current": 1,
        "suggested": 2,
        "why": "1 checkout(s) timed out waiting for a connection: grow the pool (or find the slow queries holding "
        "connections)",
    }
    assert "DB_POOL_SIZE: 1 -> 2  (1 checkout(s) timed out" in format_advice({"engines": {"default": advice}})


async def test_advice_shrinks_an_idle_pool_and_fits_recycle_to_the_server(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    engine = make_engine(
        pool_size=20,
        max_overflow=20,
        pool_recycle=3600,
        connect_args={"server_settings": {"idle_session_timeout": "600000"}},
    )
    app = DBPoolMiddleware(Starlette(), engine)
    async with serving(app) as client:
        for _ in range(100):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        advice = (await client.get(PATH + "/advice")).json()["engines"]["default"]
    by_setting = {item["setting"]: item for item in advice["advice"]}
    assert by_setting["DB_POOL_SIZE"]["current"] == 20
    assert by_setting["DB_POOL_SIZE"]["suggested"] == 2
    assert "at most 1 of 20 connections were ever checked out" in by_setting["DB_POOL_SIZE"]["why"]
    assert by_setting["DB_POOL_RECYCLE"] == {
        "setting": "DB_POOL_RECYCLE",
        "current": 3600,
        "suggested": 480,
        "why": "the server closes idle sessions after 600s (idle_session_timeout): recycle connections before that",
    }


@pytest.mark.servers
async def test_advise_cli_reads_a_running_app(database_url: str, tmp_path: Any) -> None:
    import signal
    import subprocess
    import sys

    from tests.servers import ROOT, Run

    run = Run(server="uvicorn", wrapped=True, database_url=database_url, log_path=tmp_path / "out.log")
    run.start(graceful=1)
    try:
        await run.wait_up()
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "asgi_dbpool", "advise", f"{run.base}{PATH}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        missing = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "asgi_dbpool", "advise", f"{run.base}/nowhere"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        run.signal(signal.SIGTERM)
        await run.wait_exit()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("engine 'default': pool_size=20, max_overflow=10, pool_recycle=3600, cpu_count=")
    assert "DB_MAX_OVERFLOW: 10 -> 20  (rule of thumb: 1-2 x DB_POOL_SIZE = 20-40)" in proc.stdout
    assert missing.returncode == 1
    assert missing.stderr.startswith(f"asgi_dbpool: could not read {run.base}/nowhere/advice: HTTP Error 404")


async def test_an_engine_sharing_a_tracked_pool_shares_its_tracker(make_engine: Callable[..., AsyncEngine]) -> None:
    """``engine.execution_options(...)`` shares the engine's pool: its checkouts are the pool's, seen by one tracker
    (the pool reports to the tracker it was given; a second tracker would see nothing)."""
    from asgi_dbpool.pool.registry import tracker_for

    engine = make_engine()
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    tracker = tracker_for(engine, "default")
    assert tracker_for(autocommit, "autocommit") is tracker
    async with autocommit.connect() as conn:
        await conn.execute(text("SELECT 1"))
        assert len(tracker.checkouts) == 1
    assert tracker.checkouts == {}
    assert tracker.checkouts_total == 1
    await engine.dispose()  # the test's engines must leave no backend (one pool: both are closed)
