"""The middleware inside the harnesses users test with (Starlette's and FastAPI's ``TestClient``, asgi-lifespan's
``LifespanManager``, ``httpx.ASGITransport`` on one event loop per test): each case is run on the same app bare
and wrapped, and the wrapped app must behave as the bare one does, except for the guarantees the middleware adds.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, ClassVar

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from asgi_dbpool import DBPoolMiddleware, StartupError
from asgi_dbpool.lifecycle.shutdown import FORCE_EXIT_BUDGET
from tests.conftest import backends, unclean_disconnects, wait_for_no_backends

REFUSED = "postgresql+asyncpg://app:s3cret@127.0.0.1:1/appdb"  # nothing listens on port 1
NOISE = (
    "event loop is closed",
    "never awaited",
    "exception terminating connection",
    "attached to a different loop",
    "unclosed",
)


@contextlib.contextmanager
def noise_recorder() -> Iterator[list[str]]:
    """Every sign of a connection that outlived its event loop: unraisable errors (garbage collection), warnings,
    and log records (SQLAlchemy's pool logs ``Exception terminating connection``), as lower-cased text."""
    found: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: found.append(  # type: ignore[method-assign]
        f"{record.getMessage()} {record.exc_info[1] if record.exc_info else ''}".lower()
    )
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: found.append(f"{u.exc_value!r} {u.object!r}".lower())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
            gc.collect()
        found.extend(str(w.message).lower() for w in caught)
    finally:
        root.removeHandler(handler)
        sys.unraisablehook = previous
        gc.collect()


def noisy(found: list[str]) -> list[str]:
    return [line for line in found if any(marker in line for marker in NOISE)]


class Engines:
    """Engines with their own application_name; checked for backends left when the test ends."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.names: list[str] = []

    def __call__(self, *, checked: bool = True) -> AsyncEngine:
        """``checked=False`` for a bare control's engine: its connections may end uncleanly, as measured."""
        name = f"h{os.getpid()}_{len(self.names)}_{time.monotonic_ns() % 10**6}"
        if checked:
            self.names.append(name)
        return create_async_engine(self.url, connect_args={"server_settings": {"application_name": name}})


@pytest.fixture
def engines(database_url: str) -> Iterator[Engines]:
    made = Engines(database_url)
    yield made
    left = asyncio.run(_left(database_url, made.names))
    assert left == dict.fromkeys(made.names, 0)
    assert unclean_disconnects(made.names) == []


async def _left(url: str, names: list[str]) -> dict[str, int]:
    return {name: await wait_for_no_backends(url, name) for name in names}


def starlette_app(engine: AsyncEngine, lifespan: Any = None, middleware: Any = ()) -> Starlette:
    async def number(request: Request) -> JSONResponse:
        async with engine.connect() as conn:
            return JSONResponse({"n": (await conn.execute(text("SELECT 7"))).scalar_one()})

    async def plain(request: Request) -> PlainTextResponse:
        return PlainTextResponse("plain")

    routes = [Route("/n", number), Route("/plain", plain)]
    return Starlette(routes=routes, lifespan=lifespan, middleware=list(middleware))


def checking_lifespan(engine: AsyncEngine) -> Any:
    """A lifespan that reaches the database at startup, as many apps do (``create_all``, a warm-up)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        yield

    return lifespan


def fastapi_app(engine: AsyncEngine, *, add_middleware: bool) -> Any:
    api = FastAPI(lifespan=checking_lifespan(engine))

    @api.get("/n")
    async def number() -> dict[str, int]:
        async with engine.connect() as conn:
            return {"n": (await conn.execute(text("SELECT 7"))).scalar_one()}

    if add_middleware:
        api.add_middleware(DBPoolMiddleware, engine=engine)
    return api


# -- 1-3: a failed lifespan raises where users test ----------------------------------------------------------------
@pytest.mark.parametrize("form", ["bare", "wrapped", "add_middleware"])
def test_unreachable_database_raises_at_with_testclient(form: str) -> None:
    """Bare: the app's own lifespan raises ``ConnectionRefusedError`` at ``with``. Wrapped (either form): our one
    line, as fast, and nothing hangs (before: the ``with`` entered, every request got a 503, the exit hung)."""
    engine = create_async_engine(REFUSED)
    app: Any = fastapi_app(engine, add_middleware=form == "add_middleware")
    if form == "wrapped":
        app = DBPoolMiddleware(app, engine, startup_timeout=5)
    started = time.monotonic()
    expected: type[BaseException] = ConnectionRefusedError if form == "bare" else StartupError
    with pytest.raises(expected) as raised, TestClient(app):
        pytest.fail("the with block was entered")  # pragma: no cover
    assert time.monotonic() - started < 5 + 1  # within startup_timeout plus a second (before: a hang)
    if form != "bare":
        assert str(raised.value) == (
            "asgi_dbpool: cannot reach database 'default' at postgresql+asyncpg://app:***@127.0.0.1:1/appdb: "
            "ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 1)"
        )
    asyncio.run(engine.dispose())


@pytest.mark.anyio
@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "wrapped"])
async def test_unreachable_database_raises_at_lifespan_manager(wrapped: bool) -> None:
    """Before: a bare ``TimeoutError()`` after the manager's 5 s; with ``startup_timeout=None`` a hang."""
    engine = create_async_engine(REFUSED)
    app: Any = starlette_app(engine, checking_lifespan(engine))
    if wrapped:
        app = DBPoolMiddleware(app, engine, startup_timeout=5)
    started = time.monotonic()
    with pytest.raises(StartupError if wrapped else ConnectionRefusedError, match="Connect call failed"):
        async with LifespanManager(app, startup_timeout=None):
            pytest.fail("entered")  # pragma: no cover
    assert time.monotonic() - started < 5 + 1  # within startup_timeout plus a second (before: a hang)
    await engine.dispose()


def raising_at(where: str) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        if where == "startup":
            raise ValueError("startup broke")
        yield
        if where == "shutdown":
            raise ValueError("shutdown broke")

    return lifespan


class FailingMiddleware:
    """A middleware on the lifespan path whose own startup step fails (a config check when startup begins).

    (One that raises before anything reads the first lifespan message looks like an app without lifespan support,
    as uvicorn's ``--lifespan auto`` judges it: the middleware's own startup still runs, see docs/testing-your-app.md.)
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def checking_receive() -> Any:
            message = await receive()
            if message["type"] == "lifespan.startup":
                raise LookupError("middleware check failed")
            return message  # pragma: no cover

        await self.app(scope, checking_receive if scope["type"] == "lifespan" else receive, send)


def outcome_of(run: Callable[[], Any]) -> tuple[str, str, str]:
    """(where it raised: enter, body or exit; exception type; message)."""
    stage = ["enter"]
    try:
        run_stage = run(stage)
    except BaseException as exc:
        return stage[0], type(exc).__name__, str(exc)
    return stage[0], "-", str(run_stage)


CONVENTIONS = ["startup raises", "shutdown raises", "middleware raises", "no lifespan", "client reused after with"]


def convention_app(case: str, engine: AsyncEngine) -> Starlette:
    if case == "startup raises":
        return starlette_app(engine, raising_at("startup"))
    if case == "shutdown raises":
        return starlette_app(engine, raising_at("shutdown"))
    if case == "middleware raises":
        return starlette_app(engine, middleware=[Middleware(FailingMiddleware)])
    return starlette_app(engine)


def run_convention(case: str, app: Any) -> Callable[[list[str]], Any]:
    def run(stage: list[str]) -> Any:
        client = TestClient(app)
        with client:
            stage[0] = "body"
            first = client.get("/n").json()
            stage[0] = "exit"
        stage[0] = "after"
        if case == "client reused after with":  # Starlette's own tests use a client after its with block
            return [first, client.get("/plain").status_code, client.get("/plain").text]
        return first

    return run


@pytest.mark.parametrize("case", CONVENTIONS)
def test_lifespan_conventions_wrapped_as_bare(case: str, engines: Engines) -> None:
    """Starlette-style lifespan conventions: the same outcome (where it raises, what, the answers) bare and wrapped."""
    bare_engine, wrapped_engine = engines(checked=False), engines()
    with noise_recorder():  # the bare control may leave a connection to the garbage collector
        bare = outcome_of(run_convention(case, convention_app(case, bare_engine)))
        asyncio.run(bare_engine.dispose())
    wrapped_app = DBPoolMiddleware(convention_app(case, wrapped_engine), wrapped_engine)
    wrapped = outcome_of(run_convention(case, wrapped_app))
    expected = {
        "startup raises": ("enter", "ValueError", "startup broke"),
        "shutdown raises": ("exit", "ValueError", "shutdown broke"),
        "middleware raises": ("enter", "LookupError", "middleware check failed"),
        "no lifespan": ("after", "-", "{'n': 7}"),
        "client reused after with": ("after", "-", "[{'n': 7}, 200, 'plain']"),
    }[case]
    assert bare == expected
    assert wrapped == expected
    if case == "client reused after with":  # better than bare: its pool's connection belongs to a closed loop
        assert TestClient(wrapped_app).get("/n").json() == {"n": 7}
    asyncio.run(wrapped_engine.dispose())


# -- 4: a cancelled shutdown closes everything ---------------------------------------------------------------------
@pytest.mark.anyio
async def test_a_cancelled_shutdown_closes_everything_and_can_start_again(
    make_engine: Callable[..., AsyncEngine], database_url: str
) -> None:
    """``LifespanManager(shutdown_timeout=0.5)`` cancels an app whose shutdown would take 30 s: everything is closed
    within the forced path's budget, min(shutdown_timeout, FORCE_EXIT_BUDGET). Before: a backend of the app still
    there afterwards and the lifecycle left in ``stopping``."""
    engine = make_engine()
    name = make_engine.name_of(engine)  # type: ignore[attr-defined]

    runs: list[int] = []

    @contextlib.asynccontextmanager
    async def slow_shutdown(app: Any) -> AsyncIterator[None]:
        runs.append(len(runs))
        yield
        if runs == [0]:  # the first run's shutdown only
            async with engine.connect() as conn:
                await conn.execute(text("SELECT pg_sleep(30)"))

    app = DBPoolMiddleware(starlette_app(engine, slow_shutdown), engine)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with LifespanManager(app, shutdown_timeout=0.5), engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    assert time.monotonic() - started < 0.5 + FORCE_EXIT_BUDGET
    assert await backends(database_url, name) == 0
    assert app.lifecycle.state == "stopped"
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("asgi_dbpool")] == []
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client,
    ):
        assert app.lifecycle.state == "running"
        assert (await client.get("/n")).json() == {"n": 7}


@pytest.mark.anyio
@pytest.mark.parametrize("wrapped", [True, False], ids=["wrapped", "bare"])
async def test_a_running_lifespan_cancelled_by_its_caller_propagates(
    wrapped: bool, make_engine: Callable[..., AsyncEngine], database_url: str
) -> None:
    """A test's ``asyncio.timeout`` around a lifespan that started and waits for its shutdown message: the caller
    gets its ``TimeoutError``, as bare. Wrapped, everything is closed first (no backend left, the lifecycle
    stopped) and the app can start again. Before: the middleware ended the lifespan quietly, as it does for a
    server's forced exit, so the timeout never fired and the caller saw the lifespan return."""
    engine = make_engine()
    name = make_engine.name_of(engine)  # type: ignore[attr-defined]
    inner = starlette_app(engine)
    app: Any = DBPoolMiddleware(inner, engine) if wrapped else inner
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    await inbox.put({"type": "lifespan.startup"})
    async with engine.connect() as conn:  # a pooled connection, idle when the lifespan is cancelled
        await conn.execute(text("SELECT 1"))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send)
    # Bare, Starlette's router answers its own cancellation with shutdown.failed; wrapped, the router's lifespan is
    # cancelled by the middleware's closing, and what it says then stays inside (nobody asked for a shutdown).
    assert (
        sent == ["lifespan.startup.complete"] if wrapped else ["lifespan.startup.complete", "lifespan.shutdown.failed"]
    )
    if not wrapped:  # the control: nothing closed the pooled connection
        assert await backends(database_url, name) == 1
        await engine.dispose()
        return
    assert await backends(database_url, name) == 0
    assert app.lifecycle.state == "stopped"
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client,
    ):
        assert (await client.get("/n")).json() == {"n": 7}


# -- 5-6: requests with no lifespan running ------------------------------------------------------------------------
def six_requests_without_lifespan(app: Any) -> list[int | str]:
    """FastAPI's tutorial style: ``TestClient(app)`` without ``with``, each request on a new event loop."""
    client = TestClient(app, raise_server_exceptions=True)
    outcomes: list[int | str] = []
    for _ in range(6):
        try:
            outcomes.append(client.get("/n").status_code)
        except Exception as exc:
            outcomes.append(type(exc).__name__)
    return outcomes


def test_requests_without_lifespan_on_new_loops(engines: Engines, caplog: pytest.LogCaptureFixture) -> None:
    """Bare: the first request answers, the later ones fail (another loop's connection), noise at exit.
    Wrapped: every request answers, no noise, one WARNING saying what the middleware does."""
    bare_engine = engines(checked=False)
    with noise_recorder() as bare_noise:
        bare = six_requests_without_lifespan(starlette_app(bare_engine))
        del bare_engine
    assert bare[0] == 200
    assert bare.count(200) < 6  # the control: the bare app fails on the later loops
    assert noisy(bare_noise) != []

    engine = engines()
    caplog.set_level(logging.WARNING, logger="asgi_dbpool")
    with noise_recorder() as wrapped_noise:
        wrapped = six_requests_without_lifespan(DBPoolMiddleware(starlette_app(engine), engine))
        del engine
    assert wrapped == [200] * 6
    assert noisy(wrapped_noise) == []
    warnings_given = [r.getMessage() for r in caplog.records if r.name == "asgi_dbpool"]
    assert len(warnings_given) == 1
    assert warnings_given[0].startswith("DBPoolMiddleware is serving a request but no lifespan is running")


def test_a_loop_per_test_with_asgi_transport(engines: Engines) -> None:
    """pytest-asyncio gives each test its own loop: three tests, each with httpx.ASGITransport and no lifespan."""

    async def one_test(app: Any) -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            answers = await asyncio.gather(*(client.get("/n") for _ in range(3)))
            return [r.status_code for r in answers] + [(await client.get("/n")).status_code]

    def three_tests(app: Any) -> list[Any]:
        outcomes: list[Any] = []
        for _ in range(3):
            try:
                outcomes.append(asyncio.run(one_test(app)))
            except Exception as exc:
                outcomes.append(type(exc).__name__)
        return outcomes

    bare_engine = engines(checked=False)
    with noise_recorder() as bare_noise:
        bare = three_tests(starlette_app(bare_engine))
        del bare_engine
    assert bare[0] == [200] * 4
    assert bare[1:] != [[200] * 4] * 2
    assert noisy(bare_noise) != []

    engine = engines()
    with noise_recorder() as wrapped_noise:
        wrapped = three_tests(DBPoolMiddleware(starlette_app(engine), engine))
        del engine
    assert wrapped == [[200] * 4] * 3
    assert noisy(wrapped_noise) == []


def test_after_a_failed_startup_requests_pass_through(engines: Engines) -> None:
    """Before: every request after a failed startup answered 503 "the server is shutting down"."""
    engine = engines()
    app = DBPoolMiddleware(starlette_app(engine, raising_at("startup")), engine)
    client = TestClient(app)
    with pytest.raises(ValueError, match="startup broke"), client:
        pass  # pragma: no cover
    assert app.lifecycle.state == "stopped"
    answer = client.get("/n")
    assert (answer.status_code, answer.json()) == (200, {"n": 7})


# -- 7: ASGI2 apps -------------------------------------------------------------------------------------------------
class ASGI2:
    """An ASGI 2 app: the class is called with the scope, the instance with receive and send."""

    lifespan: ClassVar[list[str]] = []  # the lifespan messages it received

    def __init__(self, scope: Any) -> None:
        self.scope = scope

    async def __call__(self, receive: Any, send: Any) -> None:
        if self.scope["type"] == "lifespan":
            while True:
                message = await receive()
                ASGI2.lifespan.append(message["type"])
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await PlainTextResponse(f"asgi2 {self.scope['path']}")(self.scope, receive, send)


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "wrapped"])
def test_an_asgi2_app_works_as_under_testclient(wrapped: bool, engines: Engines) -> None:
    """Before: ``TypeError: ... takes 1 positional argument but 3 were given`` at the first request."""
    engine = engines()
    app: Any = DBPoolMiddleware(ASGI2, engine) if wrapped else ASGI2
    ASGI2.lifespan.clear()
    with TestClient(app) as client:
        assert client.get("/x").text == "asgi2 /x"
    assert ASGI2.lifespan == ["lifespan.startup", "lifespan.shutdown"]  # its own lifespan ran, wrapped too
    asyncio.run(engine.dispose())
