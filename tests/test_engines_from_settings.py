"""``PoolSettings.from_env``: the report's variables, profile defaults and clear errors."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from asgi_dbpool import PoolSettings

pytestmark = pytest.mark.anyio


async def test_create_async_engine_uses_the_settings(database_url: str) -> None:
    s = PoolSettings.from_env(
        {"DATABASE_URL": database_url.replace("+asyncpg", "+psycopg2"), "DB_POOL_SIZE": "3", "DB_QUERY_TIMEOUT": "7"}
    )
    engine = s.create_async_engine()
    try:
        assert isinstance(engine, AsyncEngine)
        assert engine.url.drivername == "postgresql+asyncpg"  # DATABASE_URL's driver switched
        assert engine.pool.size() == 3
        assert engine.pool._recycle == 3600
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            assert raw.driver_connection._config.command_timeout == 7
    finally:
        await engine.dispose()


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_create_sync_engine_uses_database_url(database_url: str, driver: str) -> None:
    """psycopg 3 is a sync driver too (and an async one): both build the legacy engine, with the query timeout."""
    from sqlalchemy import text

    s = PoolSettings.from_env(
        {"DATABASE_URL": database_url.replace("+asyncpg", f"+{driver}"), "DB_QUERY_TIMEOUT": "1.5"}
    )
    engine = s.create_sync_engine()
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "1500ms"
    finally:
        engine.dispose()


async def test_engines_from_settings_are_built_on_the_tracked_pool_class(database_url: str) -> None:
    """``poolclass=`` a tracked subclass of the dialect's own pool class: the pool the engine was built with is the
    one the middleware tracks (no replacement), the middleware names its tracker, and ``engine.dispose()`` keeps it."""
    from sqlalchemy import text
    from sqlalchemy.pool import AsyncAdaptedQueuePool

    from asgi_dbpool import DBPoolMiddleware
    from asgi_dbpool.pool.tracked_pool import TrackedPool

    engine = PoolSettings.from_env({"DATABASE_URL": database_url, "DB_POOL_SIZE": "3"}).create_async_engine()
    built = engine.sync_engine.pool
    try:
        assert type(built).__name__ == "TrackedAsyncAdaptedQueuePool"
        assert type(built).__mro__[2] is AsyncAdaptedQueuePool  # (TrackedPool, then the dialect's own class)
        assert (built.size(), built.timeout()) == (3, 30.0)  # its creation arguments reached it
        app = DBPoolMiddleware(lambda scope, receive, send: None, {"primary": engine})  # type: ignore[arg-type, return-value]
        assert engine.sync_engine.pool is built  # tracked from the start: nothing replaced
        [tracker] = app.all_trackers()
        assert (tracker.name, tracker.acquisition.name, tracker.pool_size_now) == ("primary", "primary", 3)
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
            assert [c.site.rsplit("/", 1)[-1] for c in tracker.checkouts.values()] == [
                f"test_engines_from_settings.py:{conn_line()}"
            ]
        assert (tracker.create.count, tracker.checkouts_total) == (1, 1)
        await engine.dispose()
        assert type(engine.sync_engine.pool) is type(built)  # recreate() keeps the class, and the tracker
    finally:
        await engine.dispose()

    # The caller's own poolclass= is the one subclassed.
    class LifoPool(AsyncAdaptedQueuePool):
        pass

    lifo = PoolSettings.from_env({"DATABASE_URL": database_url}).create_async_engine(poolclass=LifoPool)
    try:
        assert type(lifo.sync_engine.pool).__mro__[1:3] == (TrackedPool, LifoPool)
    finally:
        await lifo.dispose()


def conn_line() -> int:
    """The line of ``async with engine.connect()`` in the test above."""
    import inspect

    source, start = inspect.getsourcelines(test_engines_from_settings_are_built_on_the_tracked_pool_class)
    return start + next(i for i, line in enumerate(source) if "async with engine.connect() as conn" in line)


def test_sync_engines_from_settings_are_built_on_the_tracked_pool_class(database_url: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.pool import QueuePool

    from asgi_dbpool.pool.registry import tracker_for

    settings = PoolSettings.from_env({"DATABASE_URL": database_url.replace("+asyncpg", "+psycopg2")})
    engine = settings.create_sync_engine()
    try:
        assert type(engine.pool).__name__ == "TrackedQueuePool"
        assert type(engine.pool).__mro__[2] is QueuePool
        tracker = tracker_for(engine, "legacy")
        assert tracker.name == "legacy"
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
            assert len(tracker.checkouts) == 1
        assert (tracker.create.count, tracker.checkouts_total, len(tracker.checkouts)) == (1, 1, 0)
    finally:
        engine.dispose()
