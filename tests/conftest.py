"""Fixtures: one real PostgreSQL for the session (embedded, see ``demo_app.embedded``, unless
``ASGI_DBPOOL_TEST_DATABASE_URL`` names one) and engines whose backends are checked after each test."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asgi_dbpool.lifecycle import log_filter
from asgi_dbpool.lifecycle.shutdown_flag import clear_shutting_down
from asgi_dbpool.lifecycle.signals import STOP_SIGNALS
from demo_app.embedded import EmbeddedPostgres
from tests.mariadb import MariaDB

_counter = itertools.count()


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def fresh_process_state() -> Iterator[None]:
    """Each test starts from the process state a new process has, and leaves it so: no app's shutdown flag, no
    noise filter installed, the library's logger and the stop signals' handlers as they were."""
    logger = logging.getLogger("asgi_dbpool")
    saved = (logger.level, list(logger.handlers), list(logger.filters), logger.propagate)
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    clear_shutting_down()
    yield
    clear_shutting_down()
    log_filter.uninstall()
    logger.setLevel(saved[0])
    logger.handlers[:], logger.filters[:], logger.propagate = saved[1], saved[2], saved[3]
    for sig, handler in handlers.items():
        if signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


#: What PostgreSQL logs when a client vanished instead of closing its connection.
UNCLEAN_DISCONNECT = ("unexpected EOF on client connection", "connection to client lost", "could not receive data")
SERVER_LOG: Path | None = None  # the embedded server's log file; None when an outside server is used
EMBEDDED: list[EmbeddedPostgres] = []  # the session's embedded server, when there is one


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An SQLAlchemy asyncpg URL of a live server."""
    global SERVER_LOG
    given = os.environ.get("ASGI_DBPOOL_TEST_DATABASE_URL")
    if given:
        yield str(make_url(given).set(drivername="postgresql+asyncpg"))
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pgdata"))
    server.psql(
        "ALTER SYSTEM SET log_disconnections = on; ALTER SYSTEM SET log_connections = on; "
        "ALTER SYSTEM SET log_line_prefix = '%m [%p] app=%a ';"
    )
    server.psql("SELECT pg_reload_conf();")
    SERVER_LOG = server.log
    EMBEDDED.append(server)
    try:
        yield server.url
    finally:
        SERVER_LOG = None
        EMBEDDED.clear()
        server.stop()


def unclean_disconnects(application_names: list[str]) -> list[str]:
    """Lines of the embedded server's log saying one of these clients vanished without closing."""
    if SERVER_LOG is None or not SERVER_LOG.exists():
        return []
    tags = tuple(f"app={name} " for name in application_names)
    lines = SERVER_LOG.read_text(errors="replace").splitlines()
    return [line for line in lines if any(t in line for t in tags) and any(u in line for u in UNCLEAN_DISCONNECT)]


def disconnections(application_name: str) -> int:
    """Disconnections of this client the embedded server logged (clean or not)."""
    if SERVER_LOG is None or not SERVER_LOG.exists():
        return 0
    lines = SERVER_LOG.read_text(errors="replace").splitlines()
    return sum(f"app={application_name} " in line and "disconnection:" in line for line in lines)


def asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def backends(url: str, application_name: str) -> int:
    """How many server backends carry ``application_name`` right now."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        value = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()",
            application_name,
        )
        return int(value)
    finally:
        await conn.close()


async def wait_for_no_backends(url: str, application_name: str) -> int:
    """Backends still there after the server had the chance to finish closing (bounded poll)."""
    count = await backends(url, application_name)
    for _ in range(100):
        if not count:
            break
        await asyncio.sleep(0.02)  # a backend leaves pg_stat_activity just after its socket closes
        count = await backends(url, application_name)
    return count


class EngineFactory:
    """Makes engines with unique ``application_name``s and remembers them for the leak check."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.made: list[tuple[str, AsyncEngine]] = []

    def __call__(self, **kwargs: Any) -> AsyncEngine:
        name = f"t{os.getpid()}_{next(_counter)}"
        connect_args = {"server_settings": {"application_name": name}, **kwargs.pop("connect_args", {})}
        engine = create_async_engine(self.url, connect_args=connect_args, **kwargs)
        self.made.append((name, engine))
        return engine

    def name_of(self, engine: AsyncEngine) -> str:
        return next(name for name, made in self.made if made is engine)


@pytest.fixture
async def make_engine(database_url: str) -> AsyncIterator[Callable[..., AsyncEngine]]:
    """Engine factory; after the test, every engine it made must have no backend left on the server."""
    factory = EngineFactory(database_url)
    yield factory
    left = {name: await wait_for_no_backends(database_url, name) for name, _ in factory.made}
    for _, engine in factory.made:
        await engine.dispose()
    assert left == dict.fromkeys(left, 0), f"backends left after the test: {left}"
    assert unclean_disconnects(list(left)) == []


# -- the other drivers: psycopg 3 on the same PostgreSQL, aiomysql and asyncmy on a real MariaDB, aiosqlite on a file -

#: Every async driver asgi_dbpool supports; tests parametrized over ``driver`` run against each.
DRIVERS = ("asyncpg", "psycopg", "aiomysql", "asyncmy", "aiosqlite")
#: The drivers that run on the session's MariaDB.
MARIADB_DRIVERS = ("aiomysql", "asyncmy")


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDB]:
    """One real MariaDB for the session (started on first use only)."""
    server = MariaDB(tmp_path_factory.mktemp("mariadb"))
    try:
        yield server
    finally:
        server.stop()


def url_for(driver: str, request: pytest.FixtureRequest, directory: Path) -> str:
    """A URL of a live database for ``driver``; MariaDB is started only when a MariaDB test asks for it."""
    if driver in ("asyncpg", "psycopg"):
        url = make_url(request.getfixturevalue("database_url")).set(drivername=f"postgresql+{driver}")
        return url.render_as_string(hide_password=False)
    if driver in MARIADB_DRIVERS:
        server: MariaDB = request.getfixturevalue("mariadb")
        return server.url(driver)
    return f"sqlite+aiosqlite:///{directory / 'app.db'}"


class DriverEngines:
    """Makes engines for one driver and checks, after the test, that each left nothing on the server: no session
    (PostgreSQL's ``pg_stat_activity`` by application_name; MariaDB's processlist) and no unclean goodbye
    (PostgreSQL's log; MariaDB's ``Aborted_clients`` / ``Aborted_connects`` and its error log)."""

    def __init__(self, driver: str, url: str, server: MariaDB | None) -> None:
        self.driver, self.url, self.server = driver, url, server
        self.names: list[str] = []
        self.made: list[AsyncEngine] = []
        self.aborted = server.aborted() if server else {}
        self.log_offset = len(server.log_text()) if server else 0

    def __call__(self, **kwargs: Any) -> AsyncEngine:
        connect_args = dict(kwargs.pop("connect_args", {}))
        name = f"t{os.getpid()}_{next(_counter)}"
        if self.driver == "asyncpg":
            connect_args["server_settings"] = {"application_name": name}
        elif self.driver == "psycopg":
            connect_args["application_name"] = name
        self.names.append(name)
        engine = create_async_engine(self.url, connect_args=connect_args, **kwargs)
        self.made.append(engine)
        return engine

    async def check(self) -> None:
        if self.driver in ("asyncpg", "psycopg"):
            left = {name: await wait_for_no_backends(self.url, name) for name in self.names}
            assert left == dict.fromkeys(left, 0), f"backends left after the test: {left}"
            assert unclean_disconnects(self.names) == []
        elif self.server is not None:
            assert await asyncio.to_thread(self.server.wait_for_no_connections) == 0
            assert await asyncio.to_thread(self.server.aborted) == self.aborted
            assert self.server.aborted_lines(self.log_offset) == []


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def driver_url(driver: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return url_for(driver, request, tmp_path)


@pytest.fixture
async def driver_engine(driver: str, driver_url: str, request: pytest.FixtureRequest) -> AsyncIterator[DriverEngines]:
    """Engine factory for ``driver``; after the test nothing of them may be left on the server, nor end uncleanly."""
    server = request.getfixturevalue("mariadb") if driver in MARIADB_DRIVERS else None
    factory = DriverEngines(driver, driver_url, server)
    yield factory
    for engine in factory.made:
        await engine.dispose()
    await factory.check()
