"""Typical user code, checked with ``mypy --strict`` by ``tests/test_typing.py``: it must type-check as it is."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import assert_type

from fastapi import Depends, FastAPI
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncSession

from asgi_dbpool import (
    ConfigError,
    DBPoolMiddleware,
    PoolClosedError,
    PoolOverloadedError,
    PoolSettings,
    shutdown_tolerant,
)
from asgi_dbpool.config.options import MiddlewareOptions
from asgi_dbpool.prometheus import PoolCollector
from asgi_dbpool.starlette import get_session

settings = PoolSettings.from_env()
engine = settings.create_async_engine()
options = settings.middleware_options()
assert_type(options, MiddlewareOptions)


@shutdown_tolerant()
async def count_users() -> int:
    return 1


@shutdown_tolerant(default=0)
async def count_tasks() -> int:
    return 2


async def use() -> None:
    assert_type(await count_users(), int | None)
    assert_type(await count_tasks(), int)
    task = asyncio.create_task(count_users())  # a coroutine, not just an awaitable
    assert_type(await task, int | None)
    async with shutdown_tolerant():
        pass


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    middleware = DBPoolMiddleware.current()
    middleware.register_task(asyncio.create_task(use()))
    async with middleware.sessionmaker()() as session:
        assert_type(session, AsyncSession)
    yield


api = FastAPI(lifespan=lifespan)


@api.get("/n")
async def n(session: AsyncSession = Depends(get_session)) -> dict[str, int]:  # noqa: B008 - FastAPI's idiom
    return {"n": 1}


# Starlette 0.40's add_middleware typing rejects a TypedDict's ** (later releases accept it): name the options.
api.add_middleware(DBPoolMiddleware, engine=engine, leak_threshold=options.get("leak_threshold"), retry_after=2)
wrapped = DBPoolMiddleware(api, engine, **options)
REGISTRY.register(PoolCollector())
REGISTRY.register(PoolCollector(wrapped))
errors: tuple[type[Exception], ...] = (ConfigError, PoolClosedError, PoolOverloadedError)
