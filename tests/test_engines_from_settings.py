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
