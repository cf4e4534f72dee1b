"""Shutdown stays short and quiet when the database stops answering (packets dropped: nothing answers, nothing
resets), under real uvicorn and hypercorn processes; the database sits behind ``tests.blackhole.Blackhole``.

Targets (SIGTERM to exit, ``shutdown_timeout=5``, graceful timeout 3 s): pooled connections only, at most
2.5 s; 3 stuck requests and 2 pooled connections, at most the graceful timeout + 3 s; zero tracebacks; no hang.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from starlette.applications import Starlette

from asgi_dbpool import DBPoolMiddleware
from tests.blackhole import blackhole
from tests.servers import Run

pytestmark = [pytest.mark.anyio, pytest.mark.servers]

GRACEFUL = 3.0
#: Since CPython 3.12 ``asyncio.Server.wait_closed()`` waits for open connections, and hypercorn calls it first.
HYPERCORN_WAITS_FOR_CONNECTIONS = sys.version_info >= (3, 12)
NORMAL_EXIT = {"uvicorn": -signal.SIGTERM, "hypercorn": 0}
SILENT = "the database did not answer within 0.5s at shutdown: default="


async def start(server: str, wrapped: bool, url: str, direct: str, tmp_path: Path, poller: bool = False) -> Run:
    run = Run(server, wrapped, url, tmp_path / f"{server}-{wrapped}.log", direct_url=direct)
    run.start(GRACEFUL, extra_env={"MATRIX_SHUTDOWN_TIMEOUT": "5", "MATRIX_POLLER": "on" if poller else "off"})
    await run.wait_up()
    return run


async def pool_four(run: Run) -> None:
    async with httpx.AsyncClient(base_url=run.base, timeout=10) as client:
        answers = await asyncio.gather(*(client.get("/slow") for _ in range(4)))  # four pooled connections
    assert [a.status_code for a in answers] == [200] * 4


async def stop(run: Run) -> float:
    """SIGTERM; seconds until the process exited (killed after 15 s: a hang fails the test, not the run)."""
    started = time.monotonic()
    run.signal(signal.SIGTERM)
    try:
        await run.wait_exit(15)
    except Exception:  # subprocess.TimeoutExpired: wait_exit killed it
        return float("inf")
    return time.monotonic() - started


def shutdown_output(run: Run) -> str:
    return run.output().split("shutdown flag set", 1)[-1]


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
async def test_pooled_connections_only(server: str, database_url: str, tmp_path: Path) -> None:
    async with blackhole(database_url) as (hole, url):
        run = await start(server, True, url, database_url, tmp_path)
        await pool_four(run)
        hole.drop()
        seconds = await stop(run)
    output = run.output()
    assert seconds <= 2.5, output
    assert run.exit_code == NORMAL_EXIT[server], output
    assert run.noise() == [], output
    warnings = [line for line in output.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, output
    assert SILENT in warnings[0]
    assert "1 engine(s) disposed; leaks: none" in output


async def test_control_a_plain_dispose_waits_on_the_silent_database(database_url: str) -> None:
    """The control: what the pool does without the middleware's bounded close, through the same blackhole,
    is to wait on the first connection's graceful close for as long as it is let (here, 4 s)."""
    async with blackhole(database_url) as (hole, url):
        engine = create_async_engine(url)
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        hole.drop()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(4):
                await engine.dispose()
        assert time.monotonic() - started >= 4


@pytest.mark.parametrize("wrapped", [True, False], ids=["wrapped", "bare"])
async def test_a_holder_cancelled_while_its_session_closes(wrapped: bool, database_url: str) -> None:
    """A task's ``async with AsyncSession`` is closing (its ROLLBACK sent) when the database stops answering, and
    the shutdown cancels the task. SQLAlchemy 2.0 closes in a task of its own behind ``asyncio.shield``, which the
    cancellation leaves behind (2.1 waits for it): the shutdown closes that connection, so the close fails where
    nobody awaits it, and asyncio said "Task exception was never retrieved" (about one CI run in a hundred, when
    the poller of test_a_background_task_stuck_in_a_query was closing). The control: bare, nothing closes the
    connection and the close is still waiting on the database when the app has stopped."""
    seen: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda loop, context: seen.append(context["message"]))
    try:
        async with blackhole(database_url) as (hole, url):
            engine = create_async_engine(url)
            maker = async_sessionmaker(engine)
            closing = asyncio.Event()

            async def holder() -> None:
                async with maker() as session:
                    await session.execute(text("SELECT 1"))
                    hole.drop()
                    closing.set()  # the close's ROLLBACK goes into the blackhole

            app: object = DBPoolMiddleware(Starlette(), engine, shutdown_timeout=5) if wrapped else Starlette()
            async with LifespanManager(app, shutdown_timeout=None):  # type: ignore[arg-type]
                task = asyncio.create_task(holder())
                await closing.wait()
                await asyncio.sleep(0.1)
                if not wrapped:
                    task.cancel()
            closes = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "AsyncSession.close"]  # type: ignore[union-attr]
            if not wrapped:  # nothing closed its connection: the close still waits on the database
                assert [t.done() for t in closes] == [False]
                for t in closes:
                    t.cancel()
            await asyncio.wait([task, *closes])
            assert task.cancelled() if sqlalchemy.__version__ < "2.1" or not wrapped else task.exception()
            del task, closes  # (the holder's frames hold SQLAlchemy's close task: asyncio speaks when both are gone)
            gc.collect()
            if not wrapped:
                await engine.dispose(close=False)
    finally:
        loop.set_exception_handler(None)
    assert seen == []


@pytest.mark.parametrize("wrapped", [True, False], ids=["wrapped", "bare"])
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
async def test_stuck_requests_and_pooled_connections(
    server: str, wrapped: bool, database_url: str, tmp_path: Path
) -> None:
    """3 writes stuck in the database and 2 pooled connections: the server cuts the writes at its graceful
    timeout, every one answered 503 (nothing was acknowledged, nothing stored), within the graceful timeout
    plus 3 s, quietly. The control (bare) cuts them with a 500, a reset, or a traceback."""
    async with blackhole(database_url) as (hole, url):
        run = await start(server, wrapped, url, database_url, tmp_path)
        async with httpx.AsyncClient(base_url=run.base, timeout=30) as client:
            pooled = await asyncio.gather(*(client.get("/slow") for _ in range(5)))  # 3 for the writes, 2 left idle
            assert [a.status_code for a in pooled] == [200] * 5
            writes = [
                asyncio.create_task(client.post("/write", params={"token": f"{run.name}-{i}", "sleep": 2}))
                for i in range(3)
            ]
            for _ in range(500):  # until the three writes are in the database
                if await run.active_sleeps() >= 3:
                    break
                await asyncio.sleep(0.02)
            hole.drop()
            seconds = await stop(run)
            output = run.output()  # as it was when the server exited or was killed (with its workers)
            answers = await asyncio.gather(*writes, return_exceptions=True)
    statuses = [a.status_code if isinstance(a, httpx.Response) else type(a).__name__ for a in answers]
    assert await run.stored() == {}  # the INSERTs never reached the database
    if server == "hypercorn" and HYPERCORN_WAITS_FOR_CONNECTIONS:
        # pgjones/hypercorn#308: on Python 3.12+ hypercorn waits for every open connection before its graceful
        # timeout and before lifespan.shutdown; requests stuck on a silent database hold it until the driver's
        # query timeout (30 s here). Nothing of the middleware's runs before then, wrapped or bare (README).
        assert seconds == float("inf"), output  # still running 15 s after SIGTERM: killed
        assert "shutdown flag set" not in output
        return
    if wrapped:
        # hypercorn lets the requests it cancelled finish before lifespan.shutdown, where no middleware runs; their
        # unwinding costs SQLAlchemy's 2 s close of a cancelled query's connection there (bare: 5.3 s too).
        assert seconds <= GRACEFUL + 3 + (0.5 if server == "hypercorn" else 0), output
        assert run.exit_code == NORMAL_EXIT[server], output
        assert statuses == [503, 503, 503], output
        assert run.noise() == [], output
        # The 2 idle ones; under uvicorn the 3 cut writes' too: once the signal was heard, the middleware closes a
        # cancelled holder's connection itself (docs/guarantees.md). hypercorn's worker hears no signal and cuts them
        # before lifespan.shutdown: SQLAlchemy closes those in the requests' tasks, as before.
        cut = 3 if server == "uvicorn" else 0
        assert f"{SILENT}{2 + cut} connection(s) closed on our side" in shutdown_output(run)
    else:
        problems = {"cut requests": [s for s in statuses if s != 503], "noise": run.noise()}
        assert any(problems.values()), problems


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
async def test_a_background_task_stuck_in_a_query(server: str, database_url: str, tmp_path: Path) -> None:
    """The app's poller (never cancelled by the app) is mid-query when the database stops answering: shutdown
    cancels it, closes its connection under it if it does not end, and finishes in a few seconds, quietly."""
    async with blackhole(database_url) as (hole, url):
        run = await start(server, True, url, database_url, tmp_path, poller=True)
        await pool_four(run)
        await asyncio.sleep(0.2)
        hole.drop()
        await asyncio.sleep(0.2)  # the poller's next query is in flight, never answered
        seconds = await stop(run)
    output = run.output()
    # At worst HOLDERS_TIMEOUT + CONNECTION_CLOSE_TIMEOUT, then the process teardown (up to 1.5 s on a loaded CI).
    assert seconds <= 2.5 + 0.5 + 1.5, output
    assert run.exit_code == NORMAL_EXIT[server], output
    assert run.noise() == [], output
    assert "cancelling 1 task(s) still holding connections: " in output
    assert "(poller)" in output
    assert "shutdown finished in" in output


@pytest.mark.parametrize("wrapped", [True, False], ids=["wrapped", "bare"])
async def test_sigterm_during_a_startup_that_waits_on_the_database(
    wrapped: bool, database_url: str, tmp_path: Path
) -> None:
    """uvicorn notes the signal and waits for the lifespan startup: the middleware hears it too and ends its
    startup at once (one line, nothing left open) instead of after startup_timeout (10 s), then answers
    startup.complete so uvicorn goes on to the shutdown it was asked for. The control waits
    on its own startup (the app's ``engine.begin()``) for as long as the driver's connect timeout."""
    async with blackhole(database_url) as (hole, url):
        hole.drop()
        run = Run("uvicorn", wrapped, url, tmp_path / "startup.log", direct_url=database_url)
        run.start(GRACEFUL, extra_env={"MATRIX_POLLER": "off"})
        for _ in range(500):  # until the startup is waiting on the database
            if hole.connections:
                break
            await asyncio.sleep(0.02)
        assert hole.connections, run.output()
        seconds = await stop(run)
    output = run.output()
    if wrapped:
        assert seconds <= 2, output
        # startup.complete after everything was closed: uvicorn goes on to its shutdown and re-raises the SIGTERM
        assert run.exit_code == -signal.SIGTERM, output
        assert "startup stopped by SIGTERM before it completed; closing what it opened" in output
        assert "Application startup failed" not in output
        assert "Traceback" not in output
    else:
        assert seconds == float("inf"), output  # still waiting 15 s later; killed
