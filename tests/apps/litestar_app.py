"""A Litestar app for a real server process: ``uvicorn tests.apps.litestar_app:app`` (with ``DBPoolPlugin``) or
``...:bare_app`` (the control, the same app without it). Reads ``ASGI_DBPOOL_TEST_DATABASE_URL`` and
``MATRIX_APP_NAME`` (the ``application_name`` of its connections)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar, get
from litestar.di import Provide
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from asgi_dbpool.litestar import DBPoolPlugin

try:
    from litestar.di import NamedDependency
except ImportError:  # Litestar before 2.23 injects by name alone: NamedDependency[X] is X there

    class NamedDependency:  # type: ignore[no-redef]
        def __class_getitem__(cls, item: Any) -> Any:
            return item


logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s [%(process)d]: %(message)s")
logging.captureWarnings(True)
log = logging.getLogger("litestar_app")

NAME = os.environ.get("MATRIX_APP_NAME", "litestar_app")
leaked: list[AsyncSession] = []


def make_app(plugin: bool) -> Litestar:
    engine = create_async_engine(
        os.environ["ASGI_DBPOOL_TEST_DATABASE_URL"], connect_args={"server_settings": {"application_name": NAME}}
    )
    maker = async_sessionmaker(engine, expire_on_commit=False)

    async def poll() -> None:  # a background task that keeps querying: the plugin's shutdown cancels it
        while True:
            async with maker() as session:
                await session.execute(text("SELECT 1"))
            await asyncio.sleep(0.02)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        task = asyncio.create_task(poll())
        if plugin:
            dbpool.register_task(task)
        async with engine.connect() as conn:
            log.info("user lifespan started: %s", (await conn.execute(text("SELECT 1"))).scalar_one())
        yield
        async with engine.connect() as conn:
            log.info("user lifespan ended: %s", (await conn.execute(text("SELECT 2"))).scalar_one())

    async def on_shutdown() -> None:
        async with engine.connect() as conn:
            log.info("user on_shutdown ran: %s", (await conn.execute(text("SELECT 3"))).scalar_one())

    @get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @get("/value")
    async def value(db_session: NamedDependency[AsyncSession]) -> dict[str, int]:
        return {"value": (await db_session.execute(text("SELECT 42"))).scalar_one()}

    @get("/leak")
    async def leak() -> dict[str, int]:
        session = maker()
        await session.execute(text("SELECT 1"))  # checked out, never closed
        leaked.append(session)
        return {"leaked": len(leaked)}

    dependencies: dict[str, Any] = {}
    plugins: list[Any] = []
    if plugin:
        dbpool = DBPoolPlugin(engine, shutdown_timeout=5)
        plugins.append(dbpool)
    else:

        async def provide_session() -> AsyncIterator[AsyncSession]:
            async with maker() as session:
                yield session

        dependencies["db_session"] = Provide(provide_session)
    return Litestar(
        [health, value, leak],
        plugins=plugins,
        dependencies=dependencies,
        lifespan=[lifespan],
        on_shutdown=[on_shutdown],
        logging_config=None,
    )


app = make_app(plugin=True)
bare_app = make_app(plugin=False)
