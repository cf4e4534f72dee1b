"""The app of the real-server shutdown matrix (issue: proof on real servers).

Served by a real server process: ``uvicorn tests.apps.server_app:app`` (wrapped) or ``...:bare_app``
(the control, no middleware). Reads ``ASGI_DBPOOL_TEST_DATABASE_URL`` and ``MATRIX_APP_NAME`` (the
``application_name`` of its PostgreSQL connections and the ``run`` column of its writes). Any supported driver:
the SQL that differs (sleeping, the table) is picked by the URL's backend; SQLite, which cannot sleep in SQL, holds
the connection in Python instead.

Test-only: ``MATRIX_SLOW_WINDOW`` widens one moment of a worker's startup to ``MATRIX_SLOW_SECONDS``, so a
signal sent while the worker logs ``window <name>`` lands inside it: ``import`` (before the app exists),
``connect`` (the first connection of the process sleeps in SQL: the middleware's startup ping, or the bare app's
own startup), ``app`` (the wrapped app's lifespan startup, a transaction open). With ``MATRIX_SLOW_CLAIM`` (a
path) only the first worker to create that file is slow; the others start at once and take the traffic
(PostgreSQL only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from asgi_dbpool import DBPoolMiddleware, PoolSettings

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s [%(process)d]: %(message)s")
logging.captureWarnings(True)

RUN = os.environ.get("MATRIX_APP_NAME", "matrix")
SLOW_WINDOW = os.environ.get("MATRIX_SLOW_WINDOW")
SLOW_SECONDS = float(os.environ.get("MATRIX_SLOW_SECONDS", "2"))
# Not "SELECT pg_sleep(": the drivers count active sleeps of that shape as requests that reached the database.
SLOW_SQL = f"SELECT 1 FROM pg_sleep({SLOW_SECONDS})"


def slow_here(window: str) -> bool:
    """Whether this worker widens ``window`` (it logs that it entered it)."""
    if window != SLOW_WINDOW:
        return False
    claim = os.environ.get("MATRIX_SLOW_CLAIM")
    if claim:
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL))
        except FileExistsError:  # another worker is the slow one
            return False
    logging.getLogger("matrix").info("window %s", window)
    return True


if slow_here("import"):
    time.sleep(SLOW_SECONDS)
URL = make_url(os.environ["ASGI_DBPOOL_TEST_DATABASE_URL"])
BACKEND, DRIVER = URL.get_backend_name(), URL.get_driver_name()
CONNECT_ARGS: dict[str, Any] = {
    "asyncpg": {"server_settings": {"application_name": RUN}},
    "psycopg": {"application_name": RUN},
}.get(DRIVER, {})
# The poller's sleep is a literal: the tests tell its queries from the requests' by the text.
POLL = {"postgresql": "SELECT pg_sleep(0.02)", "mysql": "SELECT SLEEP(0.02)"}.get(BACKEND, "SELECT 1")
SLEEP = {"postgresql": "SELECT pg_sleep(:s)", "mysql": "SELECT SLEEP(:s)"}.get(BACKEND)
TABLE = {
    "postgresql": "CREATE TABLE IF NOT EXISTS matrix_writes (id serial PRIMARY KEY, run text, token text UNIQUE)",
    "mysql": "CREATE TABLE IF NOT EXISTS matrix_writes "
    "(id INT AUTO_INCREMENT PRIMARY KEY, run VARCHAR(64), token VARCHAR(128) UNIQUE)",
    "sqlite": "CREATE TABLE IF NOT EXISTS matrix_writes "
    "(id INTEGER PRIMARY KEY AUTOINCREMENT, run TEXT, token TEXT UNIQUE)",
}[BACKEND]
MYSQL_TABLE_EXISTS = (
    "SELECT count(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = 'matrix_writes'"
)
# DB_PGBOUNCER=transaction when the URL is a PgBouncer's (the PgBouncer workers test; "off" is its control).
settings = PoolSettings(pool_size=20, max_overflow=10, pgbouncer=os.environ.get("DB_PGBOUNCER", "off"))
engine = settings.create_async_engine(URL, connect_args=CONNECT_ARGS)
maker = async_sessionmaker(engine, expire_on_commit=False)
if SLOW_WINDOW == "connect":
    connected: list[bool] = []

    @event.listens_for(engine.sync_engine, "connect")
    def slow_first_connect(dbapi_connection: Any, record: Any) -> None:
        if not connected:
            connected.append(True)
            if slow_here("connect"):
                cursor = dbapi_connection.cursor()
                cursor.execute(SLOW_SQL)
                cursor.close()


leaked: list[AsyncSession] = []
holding = 0  # requests holding a connection in their sleep (GET /active): the tests signal once all are in


async def sleep_in(session: AsyncSession, seconds: float) -> None:
    """Keep the connection busy for ``seconds``: in SQL where the database can sleep, else held in Python."""
    global holding
    holding += 1
    try:
        if SLEEP is not None:
            await session.execute(text(SLEEP), {"s": seconds})
        else:
            await session.execute(text("SELECT 1"))
            await asyncio.sleep(seconds)
    finally:
        holding -= 1


async def poller() -> None:
    """An app background task that keeps querying and is never cancelled by the app."""
    while True:
        try:
            async with maker() as session:
                await session.execute(text(POLL))
        except Exception as exc:  # a database outage must not kill it (the fault tests stop the database)
            logging.getLogger("matrix").info("poller: %s", type(exc).__name__)
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    if slow_here("app"):
        async with engine.connect() as conn:  # before the lock below: the other workers must not wait for it
            await conn.execute(text(SLOW_SQL))
    async with engine.begin() as conn:
        if BACKEND == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(4242)"))  # servers of parallel tests race here
        # MariaDB notes an existing table (1050), and asyncmy logs each note as a WARNING: create it only once.
        exists = BACKEND == "mysql" and bool((await conn.execute(text(MYSQL_TABLE_EXISTS))).scalar())
        if not exists:
            await conn.execute(text(TABLE))
    if os.environ.get("MATRIX_POLLER", "on") == "on":
        asyncio.get_running_loop().create_task(poller())
    logging.getLogger("matrix").info("app started")  # the workers tests wait for one line per worker
    yield


async def write(request: Request) -> JSONResponse:
    token = request.query_params["token"]
    seconds = float(request.query_params.get("sleep", "0.3"))
    async with maker() as session:
        await sleep_in(session, seconds)
        row = await session.execute(
            text("INSERT INTO matrix_writes (run, token) VALUES (:r, :t) RETURNING id"), {"r": RUN, "t": token}
        )
        new_id = row.scalar_one()
        await session.commit()
    return JSONResponse({"id": new_id, "token": token})


async def read(request: Request) -> JSONResponse:
    async with maker() as session:
        return JSONResponse({"value": (await session.execute(text("SELECT 7"))).scalar_one()})


async def add(request: Request) -> JSONResponse:
    """A parameterised query (a prepared statement): 200 with the sum, or 500 with the driver's error."""
    a, b = int(request.query_params["a"]), int(request.query_params["b"])
    try:
        async with maker() as session:
            value = (await session.execute(text("SELECT CAST(:a AS int) + CAST(:b AS int)"), {"a": a, "b": b})).scalar()
    except DBAPIError as exc:
        return JSONResponse({"error": str(exc.orig)}, status_code=500)
    return JSONResponse({"sum": value})


async def slow(request: Request) -> JSONResponse:
    seconds = float(request.query_params.get("sleep", "0.6"))
    async with maker() as session:
        await sleep_in(session, seconds)
        count = (await session.execute(text("SELECT count(*) FROM matrix_writes"))).scalar_one()
    return JSONResponse({"count": count})


async def leak(request: Request) -> JSONResponse:
    session = maker()
    await session.execute(text("SELECT 1"))  # checked out, in a transaction, never closed
    leaked.append(session)
    return JSONResponse({"leaked": len(leaked)})


async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    async with maker() as session:
        await session.execute(text("SELECT 1"))
        await websocket.send_text("ready")
        while True:
            message: Any = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def active(request: Request) -> JSONResponse:
    return JSONResponse({"holding": holding})


routes = [
    Route("/health", health),
    Route("/active", active),
    Route("/write", write, methods=["POST"]),
    Route("/slow", slow),
    Route("/read", read),
    Route("/add", add),
    Route("/leak", leak),
    WebSocketRoute("/ws", ws),
]
bare_app = Starlette(routes=routes, lifespan=lifespan)
app = DBPoolMiddleware(bare_app, engine, shutdown_timeout=float(os.environ.get("MATRIX_SHUTDOWN_TIMEOUT", "5")))
