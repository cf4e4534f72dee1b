"""The app of the real-server shutdown matrix (issue: proof on real servers).

Served by a real server process: ``uvicorn tests.apps.server_app:app`` (wrapped) or ``...:bare_app``
(the control, no middleware). Reads ``ASGI_DBPOOL_TEST_DATABASE_URL`` and ``MATRIX_APP_NAME`` (the
``application_name`` of its connections and the ``run`` column of its writes).

Test-only: ``MATRIX_SLOW_WINDOW`` widens one moment of a worker's startup to ``MATRIX_SLOW_SECONDS``, so a
signal sent while the worker logs ``window <name>`` lands inside it: ``import`` (before the app exists),
``connect`` (the first connection of the process sleeps in SQL: the middleware's startup ping, or the bare app's
own startup), ``app`` (the wrapped app's lifespan startup, a transaction open). With ``MATRIX_SLOW_CLAIM`` (a
path) only the first worker to create that file is slow; the others start at once and take the traffic.
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
# DB_PGBOUNCER=transaction when the URL is a PgBouncer's (the PgBouncer workers test; "off" is its control).
settings = PoolSettings(pool_size=20, max_overflow=10, pgbouncer=os.environ.get("DB_PGBOUNCER", "off"))
engine = settings.create_async_engine(
    os.environ["ASGI_DBPOOL_TEST_DATABASE_URL"], connect_args={"server_settings": {"application_name": RUN}}
)
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


async def poller() -> None:
    """An app background task that keeps querying and is never cancelled by the app."""
    while True:
        try:
            async with maker() as session:
                await session.execute(text("SELECT pg_sleep(0.02)"))
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
        await conn.execute(text("SELECT pg_advisory_xact_lock(4242)"))  # servers of parallel tests race here
        await conn.execute(
            text("CREATE TABLE IF NOT EXISTS matrix_writes (id serial PRIMARY KEY, run text, token text UNIQUE)")
        )
    if os.environ.get("MATRIX_POLLER", "on") == "on":
        asyncio.get_running_loop().create_task(poller())
    logging.getLogger("matrix").info("app started")  # the workers tests wait for one line per worker
    yield


async def write(request: Request) -> JSONResponse:
    token = request.query_params["token"]
    seconds = float(request.query_params.get("sleep", "0.3"))
    async with maker() as session:
        await session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
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
        await session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
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


routes = [
    Route("/health", health),
    Route("/write", write, methods=["POST"]),
    Route("/slow", slow),
    Route("/read", read),
    Route("/add", add),
    Route("/leak", leak),
    WebSocketRoute("/ws", ws),
]
bare_app = Starlette(routes=routes, lifespan=lifespan)
app = DBPoolMiddleware(bare_app, engine, shutdown_timeout=float(os.environ.get("MATRIX_SHUTDOWN_TIMEOUT", "5")))
