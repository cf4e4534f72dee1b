"""Apps whose lifespan fails, served by real servers to show what each server prints (tests/test_server_output.py).

``unreachable``: the database does not answer (nothing listens on port 1); ``shutdown_raises``: the app's own
lifespan raises at shutdown (``ASGI_DBPOOL_TEST_DATABASE_URL`` is reachable). Each with the middleware; the
``bare_*`` twins without it are the controls.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette

from asgi_dbpool import DBPoolMiddleware

REFUSED = "postgresql+asyncpg://app:s3cret@127.0.0.1:1/appdb"
_unreachable_engine = create_async_engine(REFUSED)
_engine = create_async_engine(os.environ.get("ASGI_DBPOOL_TEST_DATABASE_URL", REFUSED))


@contextlib.asynccontextmanager
async def _connecting(app: Any) -> AsyncIterator[None]:
    async with _unreachable_engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    yield


@contextlib.asynccontextmanager
async def _raising_at_shutdown(app: Any) -> AsyncIterator[None]:
    yield
    raise RuntimeError("flush failed")


bare_unreachable = Starlette(lifespan=_connecting)
unreachable = DBPoolMiddleware(Starlette(lifespan=_connecting), _unreachable_engine, startup_timeout=5)
bare_shutdown_raises = Starlette(lifespan=_raising_at_shutdown)
shutdown_raises = DBPoolMiddleware(Starlette(lifespan=_raising_at_shutdown), _engine)
