"""The ordered shutdown: WebSockets, in-flight requests, tasks, the app's own shutdown, leaks, disposal."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from asgi_dbpool import DBPoolMiddleware, PoolClosedError
from tests.conftest import asyncpg_dsn, backends
from tests.helpers import LifespanDriver, WebSocketPeer, cut_off_post, server_signal_handlers

pytestmark = pytest.mark.anyio
THIS_FILE = __file__


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("asgi_dbpool") and r.levelno >= level]


async def test_steps_run_in_order(make_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture) -> None:
    engine = make_engine()
    maker = async_sessionmaker(engine)
    events: list[str] = []
    request_started = asyncio.Event()
    release_request = asyncio.Event()

    async def slow(request: Request) -> PlainTextResponse:
        async with maker() as session:
            request_started.set()
            await release_request.wait()
            await session.execute(text("SELECT 1"))
        events.append("request finished")
        return PlainTextResponse("done")

    async def ws_endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        async with maker() as session:
            await session.execute(text("SELECT 1"))
            try:
                while True:
                    await websocket.receive_text()
            finally:
                events.append("websocket handler finished")

    async def background() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            events.append("registered task cancelled")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        async with maker() as session:
            await session.execute(text("SELECT 1"))
        events.append("app shutdown ran")

    inner = Starlette(routes=[Route("/slow", slow), WebSocketRoute("/ws", ws_endpoint)], lifespan=lifespan)
    app = DBPoolMiddleware(inner, engine, shutdown_timeout=5)
    driver = LifespanDriver(app)
    caplog.set_level(logging.INFO, logger="asgi_dbpool")
    await driver.startup()
    app.register_task(asyncio.create_task(background()))
    peer = WebSocketPeer(app, state=driver.state)
    await peer.connect()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        request = asyncio.create_task(client.get("/slow"))
        await request_started.wait()
        shutdown = asyncio.create_task(driver.shutdown())
        while not app.shutting_down:  # noqa: ASYNC110 - the flag is the thing under test
            await asyncio.sleep(0)
        # A request arriving now is refused cleanly.
        refused = await client.get("/slow")
        assert (refused.status_code, refused.headers["connection"]) == (503, "close")
        assert events == ["websocket handler finished"] or events == []
        release_request.set()
        assert (await request).text == "done"
        assert await shutdown == {"type": "lifespan.shutdown.complete"}
    assert events == ["websocket handler finished", "request finished", "registered task cancelled", "app shutdown ran"]
    assert peer.types() == ["websocket.accept", "websocket.close"]
    assert peer.sent[-1]["code"] == 1001
    assert peer.task is not None
    assert peer.task.done()
    assert peer.task.exception() is None
    log = messages(caplog)
    assert log[1:] == [
        "shutdown flag set (budget 5.0s)",
        "1 WebSocket(s) closed (1 were open, 0 already closed by the server; 0 closed by the server "
        "before the shutdown)",
        "1 in-flight request(s) drained",
        "monitor and 1 registered task(s) stopped",
        "1 engine(s) disposed; leaks: none",
        log[-1],
    ]
    assert log[-1].startswith("shutdown finished in ")
    # The same records carry their data for JSON log setups.
    data = [(r.step, r.engine, r.figures) for r in caplog.records if r.name == "asgi_dbpool"][1:-1]  # type: ignore[attr-defined]
    assert data == [
        ("flag", None, {"budget": 5.0}),
        ("websockets", None, {"closed": 1, "open": 1, "already_closed": 0, "closed_by_server_before": 0}),
        ("drain", None, {"drained": 1}),
        ("tasks", None, {"stopped": 1}),
        ("dispose", None, {"engines": 1, "leaks": 0}),
    ]


async def test_websocket_closed_by_the_server_first_is_fine(make_engine: Callable[..., AsyncEngine]) -> None:
    """uvicorn closes sockets (1012) before lifespan.shutdown; the middleware's close must be idempotent."""
    engine = make_engine()

    async def ws_endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.receive_text()  # raises WebSocketDisconnect when shutdown closes the socket

    app = DBPoolMiddleware(Starlette(routes=[WebSocketRoute("/ws", ws_endpoint)]), engine)
    driver = LifespanDriver(app)
    await driver.startup()
    peer = WebSocketPeer(app, state=driver.state)
    await peer.connect()
    peer.closed_by_server = True  # any further send raises, as a server's does after its own close
    assert await driver.shutdown() == {"type": "lifespan.shutdown.complete"}
    assert peer.task is not None
    await peer.task  # the WebSocketDisconnect was logged at DEBUG, not raised to the server
    assert peer.types() == ["websocket.accept"]


async def test_the_shutdown_counts_the_websockets_the_server_closed_before_it(
    make_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn closes open WebSockets with 1012, then sends lifespan.shutdown: the line says so."""
    engine = make_engine()

    async def ws_endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        with contextlib.suppress(WebSocketDisconnect):
            await websocket.receive_text()

    app = DBPoolMiddleware(Starlette(routes=[WebSocketRoute("/ws", ws_endpoint)]), engine)
    driver = LifespanDriver(app)
    caplog.set_level(logging.INFO, logger="asgi_dbpool")
    await driver.startup()
    peers = [WebSocketPeer(app, state=driver.state) for _ in range(2)]
    for peer in peers:
        await peer.connect()
    for peer, code in zip(peers, (1012, 1000), strict=True):  # the server's shutdown close; a client's close
        await peer.inbox.put({"type": "websocket.disconnect", "code": code})
        assert peer.task is not None
        await peer.task
    assert await driver.shutdown() == {"type": "lifespan.shutdown.complete"}
    assert (
        "0 WebSocket(s) closed (0 were open, 0 already closed by the server; 1 closed by the server "
        "before the shutdown)"
    ) in messages(caplog)


async def test_a_close_frame_the_server_never_takes_holds_nothing_up(
    make_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    """granian, mid-shutdown, can leave a WebSocket close pending forever: the handler is interrupted anyway
    (after CLOSE_FRAME_TIMEOUT, not the whole drain budget) and the shutdown goes on."""
    engine = make_engine()
    maker = async_sessionmaker(engine)
    ended: list[str] = []

    async def ws_endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        async with maker() as session:
            await session.execute(text("SELECT 1"))
            try:
                while True:
                    await websocket.receive_text()
            except WebSocketDisconnect:
                ended.append("handler saw the disconnect")

    app = DBPoolMiddleware(Starlette(routes=[WebSocketRoute("/ws", ws_endpoint)]), engine, shutdown_timeout=5)
    driver = LifespanDriver(app)
    caplog.set_level(logging.INFO, logger="asgi_dbpool")
    await driver.startup()
    peer = WebSocketPeer(app, state=driver.state)
    peer.close_hangs = True
    await peer.connect()
    assert await driver.shutdown() == {"type": "lifespan.shutdown.complete"}
    assert ended == ["handler saw the disconnect"]
    assert peer.task is not None
    assert peer.task.done()
    assert peer.task.exception() is None
    log = messages(caplog)
    assert log[1:5] == [
        "shutdown flag set (budget 5.0s)",
        "the server did not take the close frame of 1 WebSocket(s) within 1.0s; their handlers were interrupted anyway",
        "0 WebSocket(s) closed (1 were open, 0 already closed by the server; 0 closed by the server "
        "before the shutdown)",
        "0 in-flight request(s) drained",
    ]
    assert messages(caplog, logging.WARNING) == [log[2]]  # no drain overrun: the drain budget was not eaten


async def test_leaked_sessions_are_reclaimed_and_gc_is_silent(
    make_engine: Callable[..., AsyncEngine], database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine()
    maker = async_sessionmaker(engine)
    leaked: list[AsyncSession] = []

    async def leak(request: Request) -> JSONResponse:
        session = maker()
        await session.execute(text("SELECT 1"))  # this line is the checkout site
        leaked.append(session)
        return JSONResponse({"leaked": len(leaked)})

    leak_line = leak.__code__.co_firstlineno + 2
    app = DBPoolMiddleware(Starlette(routes=[Route("/leak", leak)]), engine)
    caplog.set_level(logging.DEBUG)
    async with LifespanManager(app) as manager:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client:
            assert (await client.get("/leak")).json() == {"leaked": 1}
            assert (await client.get("/leak")).json() == {"leaked": 2}
        assert await backends(database_url, make_engine.name_of(engine)) == 2  # type: ignore[attr-defined]
    warnings_logged = messages(caplog, logging.WARNING)
    assert len(warnings_logged) == 2
    for line in warnings_logged:
        assert f"closing a leaked connection checked out at {THIS_FILE}:{leak_line} " in line
    assert await backends(database_url, make_engine.name_of(engine)) == 0  # type: ignore[attr-defined]
    caplog.clear()
    gc.collect()  # earlier garbage first (the lowest test tools leave anyio streams to it: pyproject ignores them)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", "Unclosed <MemoryObject", ResourceWarning)  # (the same, made meanwhile)
        leaked.clear()
        gc.collect()
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("sqlalchemy")] == []


async def test_tasks_holding_connections_are_cancelled_and_close_cleanly(
    make_engine: Callable[..., AsyncEngine], database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine()
    maker = async_sessionmaker(engine)
    holding = asyncio.Event()
    outcome: list[str] = []

    async def forgotten_worker() -> None:
        try:
            async with maker() as session, session.begin():
                await session.execute(text("SELECT 1"))
                holding.set()
                await session.execute(text("SELECT pg_sleep(30)"))  # cancelled mid-query
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    app = DBPoolMiddleware(returning_app, engine, shutdown_timeout=5)
    caplog.set_level(logging.INFO, logger="asgi_dbpool")
    async with LifespanManager(app):
        task = asyncio.create_task(forgotten_worker(), name="forgotten")
        await holding.wait()
    assert task.cancelled()
    assert outcome == ["cancelled"]
    assert any("cancelling 1 task(s) still holding connections: forgotten" in m for m in messages(caplog))
    assert messages(caplog, logging.WARNING) == []
    assert await backends(database_url, make_engine.name_of(engine)) == 0  # type: ignore[attr-defined]


async def test_checkout_after_shutdown_fails_at_once(
    make_engine: Callable[..., AsyncEngine], database_url: str
) -> None:
    engine = make_engine()
    async with LifespanManager(DBPoolMiddleware(returning_app, engine)):
        pass
    with pytest.raises(PoolClosedError, match="engine 'default' is closed for shutdown"):
        async with engine.connect():
            pass  # pragma: no cover
    assert await backends(database_url, make_engine.name_of(engine)) == 0  # type: ignore[attr-defined]
    # A new lifespan (a restarted app in the same process) opens the engine again.
    async with LifespanManager(DBPoolMiddleware(returning_app, engine)), engine.connect() as conn:
        assert (await conn.execute(text("SELECT 3"))).scalar_one() == 3


async def test_budget_runs_out_but_the_answer_still_goes_out(
    make_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine()
    started = asyncio.Event()
    released = asyncio.Event()

    async def stubborn(request: Request) -> PlainTextResponse:
        started.set()
        while not released.is_set():  # ignores cancellation: the worst kind of handler
            with contextlib.suppress(asyncio.CancelledError):
                await released.wait()
        return PlainTextResponse("late")

    app = DBPoolMiddleware(Starlette(routes=[Route("/", stubborn)]), engine, shutdown_timeout=0.5)
    driver = LifespanDriver(app)
    caplog.set_level(logging.INFO, logger="asgi_dbpool")
    await driver.startup()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    request = asyncio.create_task(client.get("/"))
    await started.wait()
    try:
        assert await driver.shutdown() == {"type": "lifespan.shutdown.complete"}
    finally:
        released.set()
        await request
        await client.aclose()
    overruns = messages(caplog, logging.WARNING)
    assert overruns == [
        "shutdown budget (shutdown_timeout=0.5s) ran out waiting for in-flight HTTP requests; "
        "still running: 1 request(s); moving on"
    ]


async def test_force_exit_still_closes_connections(
    make_engine: Callable[..., AsyncEngine], database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn's second Ctrl+C: the lifespan is cancelled without lifespan.shutdown."""
    engine = make_engine()
    maker = async_sessionmaker(engine)
    leaked: list[AsyncSession] = []
    holding = asyncio.Event()

    async def leak(request: Request) -> PlainTextResponse:
        session = maker()
        await session.execute(text("SELECT 1"))
        leaked.append(session)
        return PlainTextResponse("leaked")

    async def worker() -> None:
        async with maker() as session:
            await session.execute(text("SELECT 1"))
            holding.set()
            await asyncio.Event().wait()

    app = DBPoolMiddleware(Starlette(routes=[Route("/leak", leak)]), engine)
    driver = LifespanDriver(app)
    caplog.set_level(logging.INFO, logger="asgi_dbpool")
    await driver.startup()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/leak")).text == "leaked"
    task = asyncio.create_task(worker(), name="worker")
    await holding.wait()
    assert await backends(database_url, make_engine.name_of(engine)) == 2  # type: ignore[attr-defined]
    assert driver.task is not None
    driver.task.cancel()
    await driver.task  # ends quietly: a server prints whatever escapes the lifespan as a traceback
    assert not driver.task.cancelled()
    assert driver.types() == ["lifespan.startup.complete"]
    assert task.cancelled()
    log = messages(caplog)
    assert "lifespan cancelled without a shutdown message; closing connections now" in log
    holders = f"cancelling 1 task(s) still holding connections: worker ({worker.__qualname__})"
    assert holders in log
    assert sum("closing a leaked connection" in line for line in log) == 1
    assert await backends(database_url, make_engine.name_of(engine)) == 0  # type: ignore[attr-defined]


async def returning_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    return None


@pytest.mark.parametrize("by_server", [True, False], ids=["forced-exit", "cancelled-by-the-caller"])
async def test_a_forced_exit_that_cuts_a_session_close_is_no_leak(
    by_server: bool, make_engine: Callable[..., AsyncEngine], database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The shutdown matrix's rare case, made deterministic: uvicorn's forced exit (``asyncio.run``) cancels every task
    at once, SQLAlchemy's close task of a session too, before it ran: that connection is never checked in. The
    shutdown closes it and says the exit cut it off, not that the app leaked it. Control: the same cut when the
    lifespan's cancellation is the caller's (a test's timeout) is reported as a leak, its holder cancelled."""
    engine = make_engine()
    maker = async_sessionmaker(engine)
    closing = asyncio.Event()

    async def worker() -> None:
        async with maker() as session:
            await session.execute(text("SELECT 1"))  # the checkout
            closing.set()  # wakes the test before SQLAlchemy's close task, made next, runs

    app = DBPoolMiddleware(Starlette(), engine)

    async def callers_frame(scope: Any, receive: Any, send: Any) -> None:  # the caller's code above the middleware
        await app(scope, receive, send)

    driver = LifespanDriver(app if by_server else callers_frame)
    caplog.set_level(logging.INFO, logger="asgi_dbpool")
    assert await driver.startup() == {"type": "lifespan.startup.complete"}
    task = asyncio.create_task(worker(), name="worker")
    await closing.wait()
    [close] = [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == "AsyncSession.close"]
    assert driver.task is not None
    for cancelled in (task, close, driver.task):  # all at once, as asyncio.run's forced exit does
        cancelled.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await driver.task
    assert driver.task.cancelled() is not by_server  # the server's cancellation ends quietly, the caller's propagates
    assert task.cancelled()
    assert close.cancelled()
    line = worker.__code__.co_firstlineno + 2
    site = f"checked out at {THIS_FILE}:{line} "
    log = [m for m in messages(caplog) if "connection" in m or "disposed" in m]
    if by_server:
        assert [m.split(site)[0] for m in log] == [
            "lifespan cancelled without a shutdown message; closing connections now",
            "engine 'default': closing a connection the forced exit cut off before its task gave it back: ",
            "1 engine(s) disposed; leaks: none; cut off by the forced exit: 1 closed",
        ]
    else:
        assert [m.split(site)[0] for m in log] == [
            "lifespan cancelled without a shutdown message; closing connections now",
            "engine 'default': closing a leaked connection ",
            "1 engine(s) disposed; leaks: 1 closed (see warnings above)",
        ]
    assert log[1].endswith("by task 'worker' (cancelled)"), log
    assert [r.levelname for r in caplog.records if "closing a" in r.getMessage()] == [
        "INFO" if by_server else "WARNING"
    ]
    disposed = [r.figures for r in caplog.records if getattr(r, "step", None) == "dispose"]  # type: ignore[attr-defined]
    assert disposed == [{"engines": 1, "leaks": 0, "cut_off": 1} if by_server else {"engines": 1, "leaks": 1}]
    assert await backends(database_url, make_engine.name_of(engine)) == 0  # type: ignore[attr-defined]


async def test_the_server_log_check_can_fail(database_url: str) -> None:
    """The per-test check for unclean disconnects sees a client process that dies mid-transaction (the control)."""
    from tests import conftest

    if conftest.SERVER_LOG is None:
        pytest.skip("an outside server is in use (ASGI_DBPOOL_TEST_DATABASE_URL); its log is not readable here")
    script = (
        "import asyncio, os, sys, asyncpg\n"
        "async def main():\n"
        "    conn = await asyncpg.connect(sys.argv[1], server_settings={'application_name': 'vanisher'})\n"
        "    await conn.execute('BEGIN')\n"
        "    os._exit(3)\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, conftest.asyncpg_dsn(database_url))
    assert await proc.wait() == 3
    for _ in range(200):
        found = conftest.unclean_disconnects(["vanisher"])
        if found:
            break
        await asyncio.sleep(0.01)
    assert len(found) == 1
    assert "unexpected EOF on client connection with an open transaction" in found[0]


@pytest.mark.parametrize(("code", "swallowed"), [(1012, True), (1001, True), (1000, False), (1006, False)])
async def test_disconnect_raised_after_a_server_shutdown_close(
    code: int, swallowed: bool, make_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn closes sockets with 1012 before lifespan.shutdown: the handler's WebSocketDisconnect is noise then."""

    async def ws_endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.receive_text()

    app = DBPoolMiddleware(Starlette(routes=[WebSocketRoute("/ws", ws_endpoint)]), make_engine())
    driver = LifespanDriver(app)
    await driver.startup()
    peer = WebSocketPeer(app, state=driver.state)
    await peer.connect()
    caplog.set_level(logging.DEBUG, logger="asgi_dbpool")
    await peer.inbox.put({"type": "websocket.disconnect", "code": code})
    assert peer.task is not None
    if swallowed:
        await peer.task
        assert f"WebSocket handler ended by shutdown with WebSocketDisconnect({code}" in caplog.text
    else:
        with pytest.raises(WebSocketDisconnect):
            await peer.task
    await driver.shutdown()


async def test_a_cancelled_websocket_receive_loses_no_message(make_engine: Callable[..., AsyncEngine]) -> None:
    got: list[str] = []

    async def ws_endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(websocket.receive_text(), 0.01)  # cancelled while waiting
        got.append(await websocket.receive_text())
        await websocket.receive_text()  # disconnect: shutdown closes the socket

    app = DBPoolMiddleware(Starlette(routes=[WebSocketRoute("/ws", ws_endpoint)]), make_engine())
    driver = LifespanDriver(app)
    await driver.startup()
    peer = WebSocketPeer(app, state=driver.state)
    await peer.connect()
    await asyncio.sleep(0.05)
    await peer.inbox.put({"type": "websocket.receive", "text": "hello"})
    while not got:  # noqa: ASYNC110 - waiting for the handler
        await asyncio.sleep(0.005)
    assert got == ["hello"]
    assert await driver.shutdown() == {"type": "lifespan.shutdown.complete"}
    assert peer.types() == ["websocket.accept", "websocket.close"]


async def test_a_request_cancelled_by_the_server_gets_a_clean_503(
    make_engine: Callable[..., AsyncEngine], database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """What uvicorn does when --timeout-graceful-shutdown runs out: cancel the request task."""
    engine = make_engine()
    maker = async_sessionmaker(engine)
    in_query = asyncio.Event()

    async def write(request: Request) -> PlainTextResponse:
        async with maker() as session, session.begin():
            await session.execute(text("CREATE TEMP TABLE IF NOT EXISTS t (x int)"))
            in_query.set()
            await session.execute(text("SELECT pg_sleep(30)"))
        return PlainTextResponse("never")  # pragma: no cover

    app = DBPoolMiddleware(Starlette(routes=[Route("/", write, methods=["POST"])]), engine)
    caplog.set_level(logging.WARNING, logger="asgi_dbpool")
    with server_signal_handlers():  # a server: its signal handlers, then the lifespan
        async with LifespanManager(app):
            sent = await cut_off_post(app, in_query, "Task cancelled, timeout graceful shutdown exceeded")
    assert sent[0]["status"] == 503
    assert (b"connection", b"close") in sent[0]["headers"]
    assert messages(caplog, logging.WARNING) == [
        "POST / was cancelled by the server (shutting down) before it answered; answering 503"
    ]


async def test_a_refused_checkout_never_touches_a_pooled_connection(
    make_engine: Callable[..., AsyncEngine], database_url: str
) -> None:
    """Once shutdown reclaims, a checkout fails before the pool hands out a record: no pre-ping goes out on a
    connection that dispose is about to close, and the idle connection stays pooled for dispose."""
    from asgi_dbpool.pool.registry import tracker_for

    engine = make_engine(pool_pre_ping=True)
    tracker = tracker_for(engine, "default")
    pings: list[object] = []
    real_ping = engine.dialect.do_ping
    engine.dialect.do_ping = lambda conn: pings.append(conn) or real_ping(conn)  # type: ignore[method-assign]
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    async with engine.connect() as conn:  # a pooled connection is pinged on checkout
        await conn.execute(text("SELECT 1"))
    assert (len(pings), engine.pool.checkedin()) == (1, 1)
    tracker.refuse_checkouts()
    try:
        with pytest.raises(PoolClosedError, match="engine 'default' is closed for shutdown"):
            async with engine.connect():
                pass  # pragma: no cover
        assert (len(pings), engine.pool.checkedin(), engine.pool.checkedout()) == (1, 1, 0)
        assert tracker.snapshot()["invalid"] == 0  # a refusal is not an invalidation
        await tracker.dispose()
        assert await backends(database_url, make_engine.name_of(engine)) == 0  # type: ignore[attr-defined]
    finally:
        tracker.reopen()


async def test_tasks_waiting_for_a_connection_are_stopped_before_dispose(
    make_engine: Callable[..., AsyncEngine], database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A task waiting in the pool's queue holds no connection yet, but the moment the holder's connection comes
    back it would take it and pre-ping it while dispose runs (and the process exits): it is stopped too."""
    engine = make_engine(pool_size=1, max_overflow=0, pool_pre_ping=True)
    maker = async_sessionmaker(engine)
    holding = asyncio.Event()
    outcome: dict[str, str] = {}

    async def holder() -> None:
        try:
            async with maker() as session:
                await session.execute(text("SELECT 1"))
                holding.set()
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            outcome["holder"] = "cancelled"
            raise

    async def waiter() -> None:
        await holding.wait()
        try:
            async with maker() as session:
                await session.execute(text("SELECT 2"))
            outcome["waiter"] = "got a connection"  # pragma: no cover - the failure this test guards against
        except asyncio.CancelledError:
            outcome["waiter"] = "cancelled"
            raise
        except PoolClosedError:  # pragma: no cover - the failure this test guards against
            outcome["waiter"] = "refused after the pool gave it a record"

    app = DBPoolMiddleware(returning_app, engine, shutdown_timeout=5)
    tracker = app.all_trackers()[0]
    caplog.set_level(logging.INFO, logger="asgi_dbpool")
    async with LifespanManager(app):
        tasks = [asyncio.create_task(holder(), name="holder"), asyncio.create_task(waiter(), name="waiter")]
        await holding.wait()
        while tracker.acquisition.pending == 0:  # noqa: ASYNC110 - the waiter is in the pool's queue now
            await asyncio.sleep(0.005)
    # Both were stopped, and had finished, before the lifespan answered.
    assert [t.cancelled() for t in tasks] == [True, True]
    assert outcome == {"holder": "cancelled", "waiter": "cancelled"}
    names = f"holder ({holder.__qualname__}), waiter ({waiter.__qualname__})"
    assert f"cancelling 2 task(s) still holding connections: {names}" in messages(caplog)
    assert messages(caplog, logging.WARNING) == []
    assert (tracker.acquisition.acquiring, tracker.checkouts) == (set(), {})
    assert await backends(database_url, make_engine.name_of(engine)) == 0  # type: ignore[attr-defined]


async def test_a_request_cancelled_after_its_commit_gets_500_without_retry_after(
    make_engine: Callable[..., AsyncEngine], database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A 503 would invite a retry of a write that may already be saved: after a COMMIT the answer is 500."""
    engine = make_engine()
    maker = async_sessionmaker(engine)
    committed = asyncio.Event()
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE IF NOT EXISTS cut_writes (v int)"))
        await conn.execute(text("DELETE FROM cut_writes"))

    async def write(request: Request) -> PlainTextResponse:
        async with maker() as session:
            await session.execute(text("INSERT INTO cut_writes VALUES (1)"))
            await session.commit()
            committed.set()
            await asyncio.sleep(30)  # e.g. a slow call to another service after the commit
        return PlainTextResponse("never")  # pragma: no cover

    app = DBPoolMiddleware(Starlette(routes=[Route("/", write, methods=["POST"])]), engine)
    caplog.set_level(logging.WARNING, logger="asgi_dbpool")
    with server_signal_handlers():  # a server: its signal handlers, then the lifespan
        async with LifespanManager(app):
            sent = await cut_off_post(app, committed)
    assert sent[0]["status"] == 500
    assert b"retry-after" not in dict(sent[0]["headers"])
    assert messages(caplog, logging.WARNING) == ["POST / was cancelled by the server after it committed; answering 500"]
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        assert await conn.fetchval("SELECT count(*) FROM cut_writes") == 1  # the commit did happen
        await conn.execute("DROP TABLE cut_writes")
    finally:
        await conn.close()


async def test_a_connection_is_never_opened_while_closed_for_shutdown(
    make_engine: Callable[..., AsyncEngine], database_url: str
) -> None:
    """A task that was already waiting in the pool's queue when shutdown closed the pool may be handed a record
    whose connection was invalidated: reconnecting it is refused too, so nothing new opens during dispose."""
    from asgi_dbpool.pool.registry import tracker_for

    engine = make_engine(pool_size=1, max_overflow=0)
    tracker = tracker_for(engine, "default")
    outcome: list[str] = []

    async def waiter() -> None:
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 2"))
            outcome.append("opened a connection")  # pragma: no cover - the failure this test guards against
        except PoolClosedError as error:
            outcome.append(str(error))

    holder = await engine.connect()
    await holder.execute(text("SELECT 1"))
    task = asyncio.create_task(waiter())
    while tracker.acquisition.pending == 0:  # noqa: ASYNC110 - the waiter is in the pool's queue now
        await asyncio.sleep(0.005)
    await holder.invalidate()  # the record goes back without a connection: the next holder must open one
    tracker.refuse_checkouts()
    try:
        await holder.close()
        await task
        assert outcome == [tracker.acquisition.refusal().args[0]]
        assert tracker.create.count == 1  # the holder's connection only
        assert await backends(database_url, make_engine.name_of(engine)) == 0  # type: ignore[attr-defined]
    finally:
        tracker.reopen()
