"""Apps the benchmarks serve with a real uvicorn process: ``benchmarks.apps:<variant>``.

``BENCH_DATABASE_URL`` names the database; ``BENCH_POOL`` is ``size,overflow``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_dbpool import DBPoolMiddleware

size, overflow = (int(x) for x in os.environ.get("BENCH_POOL", "10,10").split(","))
engine = create_async_engine(
    os.environ["BENCH_DATABASE_URL"],
    pool_size=size,
    max_overflow=overflow,
    pool_timeout=float(os.environ.get("BENCH_POOL_TIMEOUT", "30")),
    connect_args={"server_settings": {"application_name": os.environ.get("BENCH_APP_NAME", "bench")}},
)
maker = async_sessionmaker(engine)


async def query(request: Request) -> PlainTextResponse:
    async with maker() as session:
        return PlainTextResponse(str((await session.execute(text("SELECT 1"))).scalar_one()))


async def hold(request: Request) -> PlainTextResponse:
    async with maker() as session:
        await session.execute(text("SELECT pg_sleep(0.05)"))
    return PlainTextResponse("held")


routes = [Route("/q", query), Route("/hold", hold)]


@contextlib.asynccontextmanager
async def report_lifespan(app: Starlette) -> AsyncIterator[None]:
    """The report's approach: a 0.1 s grace sleep, then dispose, in the shutdown handler."""
    yield
    await asyncio.sleep(0.1)
    await engine.dispose()


def __getattr__(name: str) -> Any:
    """Build only the variant the server asks for: pool options are per engine, one middleware per engine."""
    variants = {
        "bare": lambda: Starlette(routes=routes),
        "report": lambda: Starlette(routes=routes, lifespan=report_lifespan),
        "wrapped": lambda: DBPoolMiddleware(Starlette(routes=routes), engine),
        "failfast": lambda: DBPoolMiddleware(Starlette(routes=routes), engine, max_pending=size),
    }
    if name not in variants:
        raise AttributeError(name)
    return variants[name]()
