"""The report's reproduction, run in a fresh process: a real server inside ``asyncio.run``, leaked sessions,
an app background task that is never cancelled, and ``gc.collect()`` after the loop closed.

Usage: ``python -m tests.apps.repro {uvicorn|hypercorn} {on|off}`` with ``ASGI_DBPOOL_TEST_DATABASE_URL`` set (any
supported driver; PostgreSQL sessions are named by ``ASGI_DBPOOL_REPRO_NAME``, default ``repro``).
Prints one JSON line: ``{"noise": [...], "served": n, "events": [...]}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import socket
import sys
import warnings
from collections.abc import AsyncIterator
from typing import Any

import httpx
import websockets
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

NOISY = ("sqlalchemy", "asyncpg", "psycopg", "aiomysql", "asyncmy", "aiosqlite", "asyncio", "py.warnings")
noise: list[str] = []
events: list[str] = []
shutdown_began = False


class Recorder(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("asgi_dbpool"):
            events.append(f"{record.levelname} {record.getMessage()}")
            return
        if shutdown_began and record.levelno >= logging.WARNING and record.name.split(".")[0] in NOISY:
            noise.append(
                f"{record.name} {record.levelname} {record.getMessage().splitlines()[0]}"
                + (f" EXC {record.exc_info[1]!r}" if record.exc_info else "")
            )


def unraisable(args: Any) -> None:
    noise.append(f"unraisable {args.exc_type.__name__}: {args.exc_value} in {args.object!r}")


def driver_options(url: str) -> tuple[dict[str, Any], str]:
    """Connect arguments naming the session (where the server keeps a name) and a short sleeping query."""
    name = os.environ.get("ASGI_DBPOOL_REPRO_NAME", "repro")
    driver = make_url(url).get_driver_name()
    if driver == "asyncpg":
        return {"server_settings": {"application_name": name}}, "SELECT pg_sleep(0.02)"
    if driver == "psycopg":
        return {"application_name": name}, "SELECT pg_sleep(0.02)"
    if make_url(url).get_backend_name() == "mysql":
        return {}, "SELECT SLEEP(0.02)"
    return {}, "SELECT 1"  # SQLite: no sleep function; the poller's own sleep paces it


def build_app(url: str, wrap: bool) -> Any:
    connect_args, sleep = driver_options(url)
    engine = create_async_engine(url, pool_size=5, max_overflow=5, connect_args=connect_args)
    maker = async_sessionmaker(engine, expire_on_commit=False)
    leaked: list[AsyncSession] = []

    async def poller() -> None:  # an app background task that is never cancelled
        while True:
            async with maker() as session:
                await session.execute(text(sleep))
            await asyncio.sleep(0.01)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        asyncio.get_running_loop().create_task(poller())
        yield

    async def leak(request: Request) -> JSONResponse:
        session = maker()
        await session.execute(text("SELECT 1"))  # checks out a connection and never gives it back
        leaked.append(session)
        return JSONResponse({"leaked": len(leaked)})

    async def query(request: Request) -> JSONResponse:
        async with maker() as session:
            value = (await session.execute(text("SELECT 41 + 1"))).scalar_one()
        return JSONResponse({"value": value})

    async def ws(websocket: WebSocket) -> None:  # holds a session while the socket is open
        await websocket.accept()
        async with maker() as session:
            await session.execute(text("SELECT 1"))
            await websocket.send_text("ready")
            while True:
                await websocket.receive_text()

    routes = [Route("/leak", leak), Route("/query", query), WebSocketRoute("/ws", ws)]
    app: Any = Starlette(routes=routes, lifespan=lifespan)
    if wrap:
        from asgi_dbpool import DBPoolMiddleware

        app = DBPoolMiddleware(app, engine, shutdown_timeout=5.0)
    return app, leaked


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def main(server: str, wrap: bool) -> int:
    global shutdown_began
    url = os.environ["ASGI_DBPOOL_TEST_DATABASE_URL"]
    app, leaked = build_app(url, wrap)
    port = free_port()
    stop = asyncio.Event()
    if server == "uvicorn":
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        srv = uvicorn.Server(config)
        srv.install_signal_handlers = lambda: None  # type: ignore[method-assign]

        async def serve() -> None:
            task = asyncio.ensure_future(srv.serve())
            await stop.wait()
            srv.should_exit = True
            await task

    else:
        from hypercorn.asyncio import serve as hyper_serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.graceful_timeout = 0.5

        # On Python 3.12+ hypercorn waits for open connections before lifespan.shutdown (pgjones/hypercorn#308):
        # the middleware's trigger closes the WebSocket; without it, the client has to (see below).
        trigger = app.shutdown_trigger(stop.wait) if wrap else stop.wait

        async def serve() -> None:
            await hyper_serve(app, config, shutdown_trigger=trigger)  # type: ignore[arg-type]

    served = 0
    server_task = asyncio.ensure_future(serve())
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(100):
            try:
                await client.get("/query")
                break
            except httpx.TransportError:
                await asyncio.sleep(0.05)
        for path in ["/query", "/leak", "/leak", "/query"]:
            response = await client.get(path)
            response.raise_for_status()
            served += 1
    socket_client = await websockets.connect(f"ws://127.0.0.1:{port}/ws")
    assert await socket_client.recv() == "ready"
    await asyncio.sleep(0.1)  # let the poller run
    shutdown_began = True
    stop.set()
    if server == "hypercorn" and not wrap:
        await asyncio.sleep(0.1)
        await socket_client.close()  # or the bare app's hypercorn never gets to its shutdown on Python 3.12+
    await server_task
    await socket_client.close()
    events.append(f"client saw close code {socket_client.close_code}")
    del leaked
    return served


if __name__ == "__main__":
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(Recorder())
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    sys.unraisablehook = unraisable
    served = asyncio.run(main(sys.argv[1], sys.argv[2] == "on"))
    gc.collect()
    gc.collect()
    print(json.dumps({"noise": noise, "served": served, "events": events}))
