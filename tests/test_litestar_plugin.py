"""``asgi_dbpool.litestar.DBPoolPlugin`` under Litestar's own test client (which runs the lifespan): the startup
check, the session dependency, the stats endpoints, 503 on an exhausted pool, leaks reclaimed at shutdown and the
shutdown's order against the app's own lifespans and hooks; each with a control (the bare app, or the middleware
given the way Litestar adds middleware, which is per route and never sees the lifespan)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import subprocess
import sys
import types
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import litestar.di
import pytest
from litestar import Litestar, Request, get
from litestar.config.app import AppConfig
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.plugins import InitPluginProtocol
from litestar.testing import AsyncTestClient, TestClient
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from asgi_dbpool import DBPoolMiddleware, StartupError
from asgi_dbpool.config.settings import ENV_READERS
from asgi_dbpool.litestar import DBPoolPlugin
from tests.conftest import backends, unclean_disconnects, wait_for_no_backends
from tests.servers import NOISE_MARKERS, NOISY_LOGGERS, ROOT, free_port

try:
    from litestar.di import NamedDependency
except ImportError:  # Litestar before 2.23 injects by name alone: NamedDependency[X] is X there

    class NamedDependency:  # type: ignore[no-redef]
        def __class_getitem__(cls, item: Any) -> Any:
            return item


pytestmark = [
    pytest.mark.anyio,
    # Litestar 2.10's test client leaves one of its lifespan streams unclosed (later versions close them)
    pytest.mark.filterwarnings("ignore:Unclosed <MemoryObjectSendStream:ResourceWarning"),
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <function MemoryObjectSendStream.__del__:pytest.PytestUnraisableExceptionWarning"
    ),
]

STATS = "/api/system/database/pool"
leaked: list[AsyncSession] = []


class Recorder(logging.Handler):
    """The asgi_dbpool lines that mark the lifecycle's steps, into the test's event list (as they happen)."""

    MARKS: ClassVar[dict[str, str]] = {
        "engine(s) reachable": "dbpool: startup checked",
        "shutdown flag set": "dbpool: shutdown begins",
        "registered task(s) stopped": "dbpool: tasks stopped",
        "shutdown finished": "dbpool: shutdown finished",
    }

    def __init__(self, events: list[str]) -> None:
        super().__init__(logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.events.extend(mark for key, mark in self.MARKS.items() if key in message)


@contextlib.contextmanager
def recording(events: list[str]) -> Any:
    handler = Recorder(events)
    logger = logging.getLogger("asgi_dbpool")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(autouse=True)
def collect_streams() -> Iterator[None]:
    """Those streams are collected here, under this module's warning filters, not in a later test."""
    yield
    gc.collect()


def watch_disposal(engine: AsyncEngine, events: list[str]) -> None:
    @event.listens_for(engine.sync_engine, "engine_disposed")
    def disposed(sync_engine: Any) -> None:
        events.append("engine disposed")


def build(
    engine: AsyncEngine,
    events: list[str],
    *,
    plugins: list[Any] | None = None,
    middleware: list[Any] | None = None,
) -> Litestar:
    """The app: a session dependency ``db_session`` (the plugin's, or a plain one when it is absent), a lifespan
    and startup/shutdown hooks that use the database, and a few handlers."""
    held = asyncio.Event()

    async def query(session_or_engine: Any, value: int) -> int:
        return int((await session_or_engine.execute(text(f"SELECT {value}"))).scalar_one())

    @contextlib.asynccontextmanager
    async def user_lifespan(app: Litestar) -> AsyncIterator[None]:
        async with engine.connect() as conn:
            events.append(f"user lifespan enter {await query(conn, 1)}")
        yield
        async with engine.connect() as conn:
            events.append(f"user lifespan exit {await query(conn, 3)}")

    async def on_startup() -> None:
        async with engine.connect() as conn:
            events.append(f"user on_startup {await query(conn, 2)}")

    async def on_shutdown() -> None:
        async with engine.connect() as conn:
            events.append(f"user on_shutdown {await query(conn, 4)}")

    @get("/value")
    async def value(db_session: NamedDependency[AsyncSession]) -> dict[str, int]:
        return {"value": await query(db_session, 42)}

    @get("/state")
    async def state(request: Request[Any, Any, Any]) -> dict[str, bool]:
        return {"middleware": isinstance(request.scope["state"].get("asgi_dbpool"), DBPoolMiddleware)}

    @get("/hold")
    async def hold(db_session: NamedDependency[AsyncSession]) -> dict[str, int]:
        await query(db_session, 1)
        held.set()
        await asyncio.sleep(1.0)
        return {"held": 1}

    @get("/busy")
    async def busy(db_session: NamedDependency[AsyncSession]) -> dict[str, int]:
        await held.wait()
        return {"value": await query(db_session, 7)}

    @get("/leak")
    async def leak() -> dict[str, int]:
        session = AsyncSession(engine)
        await session.execute(text("SELECT 1"))  # checked out, never closed
        leaked.append(session)
        return {"leaked": len(leaked)}

    dependencies = {}
    hooks = [on_shutdown]
    if not any(isinstance(p, DBPoolPlugin) for p in plugins or []):
        maker = async_sessionmaker(engine, expire_on_commit=False)

        async def plain_session() -> AsyncIterator[AsyncSession]:
            async with maker() as session:
                yield session

        async def dispose() -> None:  # a bare app closes its pool itself (the test client's loop ends after this)
            await engine.dispose()

        dependencies["db_session"] = Provide(plain_session)
        hooks.append(dispose)
    return Litestar(
        [value, state, hold, busy, leak],
        plugins=plugins or [],
        middleware=middleware or [],
        dependencies=dependencies,
        lifespan=[user_lifespan],
        on_startup=[on_startup],
        on_shutdown=hooks,
        logging_config=None,  # Litestar would reconfigure logging (and drop the test's log capture)
    )


# -- the documented example ----------------------------------------------------------------------------------------


async def test_the_docs_example_runs(database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    section = (ROOT / "docs" / "helpers.md").read_text().split("## Litestar", 1)[1]
    (source,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:1]
    assert "plugins=[dbpool])" in source
    source = source.replace("plugins=[dbpool])", "plugins=[dbpool], logging_config=None)")  # keep pytest's logging
    monkeypatch.setattr(litestar.di, "NamedDependency", NamedDependency, raising=False)  # Litestar before 2.23
    monkeypatch.setenv("ASYNC_DATABASE_URL", make_url(database_url).render_as_string(hide_password=False))
    for variable in ENV_READERS:
        if variable != "ASYNC_DATABASE_URL":
            monkeypatch.delenv(variable, raising=False)
    module = types.ModuleType("litestar_example")
    module.__file__ = str(tmp_path / "litestar_example.py")
    monkeypatch.setitem(sys.modules, "litestar_example", module)
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    async with AsyncTestClient(module.app) as client:
        assert (await client.get("/answer")).json() == {"answer": 42}
        assert (await client.get(STATS)).json()["pool_size"] == 10  # the development profile of the settings
    assert module.dbpool.middleware.lifecycle.state == "stopped"
    assert module.engine.sync_engine.pool.checkedin() == 0  # disposed by the plugin's shutdown


# -- startup --------------------------------------------------------------------------------------------------------


async def test_unreachable_database_fails_the_startup_with_our_line() -> None:
    url = f"postgresql+asyncpg://app:secret@127.0.0.1:{free_port()}/app"
    engine = create_async_engine(url)
    started: list[str] = []

    async def on_startup() -> None:
        started.append("user startup")

    try:
        app = Litestar(
            [], plugins=[DBPoolPlugin(engine, startup_timeout=2)], on_startup=[on_startup], logging_config=None
        )
        # Litestar runs its lifespan inside its event emitter's task group (anyio): what a lifespan raises comes
        # out in an ExceptionGroup, our StartupError alone in it
        caught: list[Exception] = []
        try:
            async with AsyncTestClient(app):
                pass
        except* StartupError as group:
            caught.extend(group.exceptions)
        assert len(caught) == 1
        line = str(caught[0])
        masked = url.replace("secret", "***")
        assert line.startswith(f"asgi_dbpool: cannot reach database 'default' at {masked}: "), line
        assert "\n" not in line
        assert "secret" not in line
        assert started == []  # the check ran before the app's own startup
        # control: the bare app starts with its database down and says nothing
        async with AsyncTestClient(Litestar([], on_startup=[on_startup], logging_config=None)):
            pass
        assert started == ["user startup"]
    finally:
        await engine.dispose()


# -- requests -------------------------------------------------------------------------------------------------------


async def test_session_dependency_and_stats_endpoints(make_engine: Callable[..., AsyncEngine]) -> None:
    engine = make_engine()
    plugin = DBPoolPlugin(engine)
    async with AsyncTestClient(build(engine, [], plugins=[plugin])) as client:
        assert (await client.get("/value")).json() == {"value": 42}
        assert (await client.get("/state")).json() == {"middleware": True}
        stats = await client.get(STATS)
        assert stats.status_code == 200
        assert stats.headers["content-type"] == "application/json"
        figures = stats.json()
        assert figures["status"] == "ok"
        assert figures["checked_out"] == 0
        assert figures["checked_in"] >= 1
        assert figures["default_engine"] == "default"
        metrics = await client.get(f"{STATS}/metrics")
        assert metrics.status_code == 200
        assert "db_client_connection" in metrics.text
        assert (await client.get(f"{STATS}/ready")).json() == {"status": "ready"}
        assert (await client.get(f"{STATS}/nothing")).status_code == 404


async def test_control_middleware_given_per_route_is_inert(
    make_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    """Litestar's way of adding middleware builds it per route: no lifespan reaches it, so no stats endpoint (and
    no startup check, no shutdown: each request's connections are closed as it ends, with one WARNING)."""
    engine = make_engine()
    events: list[str] = []
    app = build(engine, events, middleware=[DefineMiddleware(DBPoolMiddleware, engine=engine)])
    with recording(events):
        async with AsyncTestClient(app) as client:
            assert [(await client.get("/value")).json() for _ in range(3)] == [{"value": 42}] * 3
            assert (await client.get(STATS)).status_code == 404
    assert "dbpool: startup checked" not in events
    assert "dbpool: shutdown begins" not in events
    named = [r.getMessage() for r in caplog.records if r.name == "asgi_dbpool" and r.levelno == logging.WARNING]
    assert len(named) == 1  # the misuse is named once, with its likely cause and the fix
    assert named[0].startswith("DBPoolMiddleware is serving a request but no lifespan is running")
    assert "Litestar's per-route middleware=[...]" in named[0]


async def test_exhausted_pool_answers_503_with_retry_after(make_engine: Callable[..., AsyncEngine]) -> None:
    for with_plugin in (True, False):
        engine = make_engine(pool_size=1, max_overflow=0, pool_timeout=0.2)
        plugins = [DBPoolPlugin(engine, retry_after=2)] if with_plugin else []
        with TestClient(build(engine, [], plugins=plugins)) as client:
            # AsyncTestClient serves one request at a time: two threads send these two at once
            holding, busy = await asyncio.gather(
                asyncio.to_thread(client.get, "/hold"), asyncio.to_thread(client.get, "/busy")
            )
            assert holding.status_code == 200
            if with_plugin:
                assert (busy.status_code, busy.headers.get("retry-after")) == (503, "2")
                assert client.get(STATS).json()["status"] == "ok"
            else:  # control: the bare app answers the pool timeout with a 500
                assert (busy.status_code, busy.headers.get("retry-after")) == (500, None)


# -- shutdown -------------------------------------------------------------------------------------------------------


async def test_leaked_session_is_reclaimed_at_shutdown_and_named(
    make_engine: Callable[..., AsyncEngine], database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine()
    name = make_engine.name_of(engine)  # type: ignore[attr-defined]
    caplog.set_level(logging.INFO, "asgi_dbpool")
    async with AsyncTestClient(build(engine, [], plugins=[DBPoolPlugin(engine)])) as client:
        assert (await client.get("/leak")).status_code == 200
        # control: the leak is real (the request is over, its connection still out, its backend open)
        assert (await client.get(STATS)).json()["checked_out"] == 1
        assert await backends(database_url, name) == 1
        assert not [r for r in caplog.records if "leaked" in r.getMessage()]
    warnings = [r.getMessage() for r in caplog.records if "closing a leaked connection" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"checked out at {__file__}:" in warnings[0], warnings[0]
    assert warnings[0].endswith("during GET /leak"), warnings[0]
    assert await wait_for_no_backends(database_url, name) == 0
    leaked.clear()


async def test_shutdown_runs_after_the_apps_own_lifespans_and_hooks(make_engine: Callable[..., AsyncEngine]) -> None:
    engine = make_engine()
    events: list[str] = []
    watch_disposal(engine, events)
    plugin = DBPoolPlugin(engine)

    async def poll() -> None:
        try:
            while True:
                async with plugin.sessionmaker()() as session:
                    await session.execute(text("SELECT 1"))
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            events.append("registered task cancelled")
            raise

    async def start_poller() -> None:
        plugin.register_task(asyncio.create_task(poll()))
        events.append(f"current is the plugin's: {DBPoolMiddleware.current() is plugin.middleware}")

    app = build(engine, events, plugins=[plugin])
    app.on_startup.append(start_poller)
    with recording(events):
        async with AsyncTestClient(app) as client:
            assert (await client.get("/value")).json() == {"value": 42}
            events.append("requests served")
    assert events == [
        "dbpool: startup checked",
        "user lifespan enter 1",
        "user on_startup 2",
        "current is the plugin's: True",
        "requests served",
        "dbpool: shutdown begins",
        "registered task cancelled",
        "dbpool: tasks stopped",
        "user lifespan exit 3",
        "user on_shutdown 4",
        "engine disposed",
        "dbpool: shutdown finished",
    ]


async def test_a_failed_app_startup_still_closes_everything(make_engine: Callable[..., AsyncEngine]) -> None:
    """An on_startup hook of the app fails after ours ran: Litestar runs the shutdown side (lifespans, hooks), our
    shutdown with it, and raises the app's error; nothing is left open (the fixture checks the server)."""
    engine = make_engine()
    events: list[str] = []

    async def broken() -> None:
        raise RuntimeError("cache warm-up failed")

    app = build(engine, events, plugins=[DBPoolPlugin(engine)])
    app.on_startup.append(broken)
    caught: list[Exception] = []
    with recording(events):
        try:
            async with AsyncTestClient(app):
                pass
        except* RuntimeError as group:
            caught.extend(group.exceptions)
    assert [str(e) for e in caught] == ["cache warm-up failed"]
    assert events == [
        "dbpool: startup checked",
        "user lifespan enter 1",
        "user on_startup 2",
        "dbpool: shutdown begins",
        "dbpool: tasks stopped",
        # the user's lifespan gets the error at its yield (it has no try/finally): no exit line
        "user on_shutdown 4",
        "dbpool: shutdown finished",
    ]


async def test_a_shutdown_hook_added_after_ours_is_named_at_startup(
    make_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine()

    class AddsAHook(InitPluginProtocol):
        def on_app_init(self, app_config: AppConfig) -> AppConfig:
            app_config.on_shutdown.append(self.hook)
            return app_config

        async def hook(self) -> None:
            pass

    def warned() -> list[str]:
        return [
            r.getMessage() for r in caplog.records if "on_shutdown hooks added after DBPoolPlugin" in r.getMessage()
        ]

    async with AsyncTestClient(build(engine, [], plugins=[AddsAHook(), DBPoolPlugin(engine)])):
        pass
    assert warned() == []  # control: listed before ours, its hook runs before the disposal
    async with AsyncTestClient(build(engine, [], plugins=[DBPoolPlugin(engine), AddsAHook()])):
        pass
    assert len(warned()) == 1


async def cancel_after_startup(app: Litestar) -> list[str]:
    """Run ``app``'s lifespan in a task as a server would, then cancel it once started (a forced exit: uvicorn's
    second Ctrl+C, asyncio.run cancelling what is left); return what the app sent."""
    inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    inbox.put_nowait({"type": "lifespan.startup"})
    sent: list[str] = []

    async def send(message: Any) -> None:
        sent.append(message["type"])

    task = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send))
    for _ in range(500):
        if sent:
            break
        await asyncio.sleep(0.01)
    assert sent == ["lifespan.startup.complete"]
    task.cancel()
    with contextlib.suppress(BaseException):  # Litestar raises what ended its lifespan, in a group or not
        await task
    return sent


async def test_a_forced_exit_runs_the_apps_shutdown_then_closes_everything(
    make_engine: Callable[..., AsyncEngine], database_url: str
) -> None:
    """The server cancels the lifespan task: Litestar unwinds its lifespan in that task (the lifespans get the
    cancellation at their yield, the on_shutdown hooks run), and the last hook closes everything."""
    engine = make_engine()
    events: list[str] = []
    with recording(events):
        await cancel_after_startup(build(engine, events, plugins=[DBPoolPlugin(engine)]))
    assert events == [
        "dbpool: startup checked",
        "user lifespan enter 1",
        "user on_startup 2",
        "user on_shutdown 4",  # still with the database (the lifespan got the cancellation at its yield)
        "dbpool: shutdown begins",
        "dbpool: tasks stopped",
        "dbpool: shutdown finished",
    ]
    assert await wait_for_no_backends(database_url, make_engine.name_of(engine)) == 0  # type: ignore[attr-defined]


async def test_control_a_forced_exit_of_the_bare_app_leaves_its_pool_open(
    make_engine: Callable[..., AsyncEngine], database_url: str
) -> None:
    engine = make_engine()
    events: list[str] = []
    app = build(engine, events)
    app.on_shutdown.remove(app.on_shutdown[-1])  # without build()'s own dispose: a bare app as people write it
    await cancel_after_startup(app)
    assert events[-1] == "user on_shutdown 4"
    assert await backends(database_url, make_engine.name_of(engine)) >= 1  # type: ignore[attr-defined]
    await engine.dispose()  # the test's own loop: closed here


async def test_control_litestar_order_disposal_in_a_lifespan_comes_too_early(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    """What the plugin's last on_shutdown hook is for: Litestar exits the lifespans in reverse order, then runs the
    on_shutdown hooks. A plugin that disposes the engine in a lifespan, even one it puts first, disposes it before
    the app's on_shutdown hooks, which then open a new connection."""
    engine = make_engine()
    events: list[str] = []
    watch_disposal(engine, events)

    class DisposeInALifespan(InitPluginProtocol):
        def on_app_init(self, app_config: AppConfig) -> AppConfig:
            app_config.lifespan.insert(0, self.lifespan)
            return app_config

        @contextlib.asynccontextmanager
        async def lifespan(self, app: Litestar) -> AsyncIterator[None]:
            yield
            await engine.dispose()

    async with AsyncTestClient(build(engine, events, plugins=[DisposeInALifespan()])):
        pass
    assert events == [
        "user lifespan enter 1",
        "user on_startup 2",
        "user lifespan exit 3",
        "engine disposed",  # the plugin's lifespan, the first one, exits last of the lifespans
        "user on_shutdown 4",  # a new connection, after the disposal
        "engine disposed",  # the bare app's own cleanup (build() adds it last)
    ]


# -- a real server --------------------------------------------------------------------------------------------------


def start_server(server: str, target: str, port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    spec = f"tests.apps.litestar_app:{target}"
    if server == "uvicorn":
        command = [sys.executable, "-m", "uvicorn", spec, "--port", str(port)]
        command += ["--lifespan", "on", "--timeout-graceful-shutdown", "10"]
    else:
        command = [sys.executable, "-m", "hypercorn", spec, "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "10"]
    with log_path.open("wb") as out:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env={
                **os.environ,
                **env,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            },
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def serve_and_stop(
    target: str, database_url: str, tmp_path: Path, server: str = "uvicorn", stop: int = signal.SIGTERM
) -> tuple[int, str, str]:
    """Run ``tests.apps.litestar_app:<target>`` under ``server``, leak two sessions, query, then send it ``stop``;
    return its exit status, its output and the application_name of its connections."""
    name = f"ls_{uuid.uuid4().hex[:10]}"
    port = free_port()
    log_path = tmp_path / f"{target}.log"
    proc = start_server(
        server, target, port, {"ASGI_DBPOOL_TEST_DATABASE_URL": database_url, "MATRIX_APP_NAME": name}, log_path
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(400):
                assert proc.poll() is None, log_path.read_text()
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/health")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
            for _ in range(2):
                assert (await client.get("/leak")).status_code == 200
            assert (await client.get("/value")).json() == {"value": 42}
        proc.send_signal(stop)
        code = await asyncio.to_thread(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, log_path.read_text(errors="replace"), name


@pytest.mark.servers
@pytest.mark.parametrize(
    ("server", "stop"),
    [("uvicorn", signal.SIGTERM), ("hypercorn", signal.SIGTERM), ("uvicorn", signal.SIGINT)],
    ids=["uvicorn", "hypercorn", "uvicorn-ctrl-c"],
)
async def test_sigterm_shuts_the_plugin_app_down_clean(
    server: str, stop: int, database_url: str, tmp_path: Path
) -> None:
    code, output, name = await serve_and_stop("app", database_url, tmp_path, server, stop)
    # uvicorn re-raises the SIGTERM it caught, after a clean shutdown (its CLI turns a SIGINT into 0); hypercorn: 0
    assert code == (-signal.SIGTERM if (server, stop) == ("uvicorn", signal.SIGTERM) else 0), output
    assert [marker for marker in NOISE_MARKERS if marker in output] == [], output
    assert NOISY_LOGGERS.findall(output) == [], output
    steps = [
        "engine(s) reachable",
        "user lifespan started: 1",
        "Application startup complete" if server == "uvicorn" else "Running on",
        "shutdown flag set",
        "monitor and 1 registered task(s) stopped",
        "user lifespan ended: 2",
        "user on_shutdown ran: 3",
        "1 engine(s) disposed; leaks: 2 closed (see warnings above)",
        "shutdown finished",
        *(["Application shutdown complete"] if server == "uvicorn" else []),
    ]
    positions = [output.find(step) for step in steps]
    assert -1 not in positions, output
    assert positions == sorted(positions), output
    reclaimed = [line for line in output.splitlines() if "closing a leaked connection" in line]
    assert len(reclaimed) == 2, output
    assert all(line.endswith("during GET /leak") for line in reclaimed), reclaimed
    assert await wait_for_no_backends(database_url, name) == 0
    assert unclean_disconnects([name]) == []


@pytest.mark.servers
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
async def test_control_sigterm_bare_app_leaves_connections(server: str, database_url: str, tmp_path: Path) -> None:
    """The same app without the plugin: the process ends with its connections open (the leaked ones, the pool's,
    the poller's), and PostgreSQL logs the clients that vanished."""
    _, output, name = await serve_and_stop("bare_app", database_url, tmp_path, server)
    assert "shutdown flag set" not in output
    await wait_for_no_backends(database_url, name)  # the server notices the vanished clients
    assert unclean_disconnects([name]) != [], output


# -- beside advanced-alchemy's plugin -------------------------------------------------------------------------------


@pytest.mark.parametrize("ours_first", [True, False], ids=["dbpool-first", "advanced-alchemy-first"])
async def test_beside_advanced_alchemys_plugin_on_one_engine(
    ours_first: bool, make_engine: Callable[..., AsyncEngine]
) -> None:
    """advanced-alchemy's ``SQLAlchemyPlugin`` (its session dependency, its lifespan) and ours on one engine, in
    either order: our startup check comes first and our shutdown begins first. advanced-alchemy's lifespan calls
    ``engine.dispose()`` as it exits, before the app's own lifespans exit and its hooks run: the pool is left as it
    is until our last step, so those hooks use the connection they used before, and the pool is disposed once, last.
    Control: the same app with advanced-alchemy's plugin alone disposes its pool before the app's shutdown code,
    which then opens a new connection."""
    from advanced_alchemy.extensions.litestar import SQLAlchemyAsyncConfig, SQLAlchemyPlugin

    def aa_plugin(engine: AsyncEngine) -> Any:
        key = f"aa_{uuid.uuid4().hex[:8]}"  # its keys are unique per process: a second config would get renamed ones
        config = SQLAlchemyAsyncConfig(
            engine_instance=engine,
            engine_dependency_key=key,
            engine_app_state_key=key,
            session_maker_app_state_key=f"{key}_maker",
            session_scope_key=f"{key}_session",
        )
        return SQLAlchemyPlugin(config=config)

    async def run(plugins: Callable[[AsyncEngine], list[Any]]) -> list[str]:
        engine = make_engine()
        events: list[str] = []
        watch_disposal(engine, events)
        served = False

        @event.listens_for(engine.sync_engine, "connect")
        def connected(*_: Any) -> None:
            if served:
                events.append("connection opened")

        @event.listens_for(engine.sync_engine, "close")
        def closed(*_: Any) -> None:
            events.append("connection closed")

        with recording(events):
            async with AsyncTestClient(build(engine, events, plugins=plugins(engine))) as client:
                assert (await client.get("/value")).json() == {"value": 42}
                if any(isinstance(p, DBPoolPlugin) for p in client.app.plugins):
                    assert (await client.get(STATS)).json()["checked_out"] == 0
                events.append("requests served")
                served = True
        return events

    def ours_and_theirs(engine: AsyncEngine) -> list[Any]:
        ours = DBPoolPlugin(engine, session_dependency_key=None)  # "db_session" is advanced-alchemy's here
        return [ours, aa_plugin(engine)] if ours_first else [aa_plugin(engine), ours]

    events = await run(ours_and_theirs)
    assert events == [
        "dbpool: startup checked",
        "user lifespan enter 1",
        "user on_startup 2",
        "requests served",
        "dbpool: shutdown begins",
        "dbpool: tasks stopped",
        "engine disposed",  # advanced-alchemy's lifespan calls engine.dispose(): the pool is left as it is
        "user lifespan exit 3",  # on the connection opened before: none is opened
        "user on_shutdown 4",
        "connection closed",  # our last step: the pool's one connection, closed once
        "engine disposed",
        "dbpool: shutdown finished",
    ]
    # Control: advanced-alchemy alone disposes the pool before the app's own shutdown code, which opens another.
    bare = await run(lambda engine: [aa_plugin(engine)])
    assert bare == [
        "user lifespan enter 1",
        "user on_startup 2",
        "requests served",
        "connection closed",
        "engine disposed",  # advanced-alchemy's lifespan
        "connection opened",
        "user lifespan exit 3",
        "user on_shutdown 4",
        "connection closed",  # the bare app's own dispose hook (see build)
        "engine disposed",
    ]


def test_the_core_package_imports_no_litestar() -> None:
    code = "import sys, asgi_dbpool; print(sorted(m for m in sys.modules if m.split('.')[0] == 'litestar'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    code = code.replace("asgi_dbpool;", "asgi_dbpool.litestar;")  # control: the plugin's module does import it
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "'litestar'" in result.stdout
