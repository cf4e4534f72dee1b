"""Which drivers and URLs are accepted, and the errors that name the others (no database needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette

from asgi_dbpool import ConfigError, DBPoolMiddleware, PoolSettings, mask_url

pytestmark = pytest.mark.anyio


SUPPORTED = "['postgresql+asyncpg', 'postgresql+psycopg', 'mysql+aiomysql', 'mysql+asyncmy', 'sqlite+aiosqlite']"

#: Engines SQLAlchemy builds but asgi_dbpool does not handle, and the end of the middleware's one sentence.
REFUSED_ENGINES = [
    ("postgresql+psycopg_async://u:secret@db/app", "uses the driver 'postgresql+psycopg_async', which"),
    ("mariadb+aiomysql://u:secret@db/app", "uses the driver 'mariadb+aiomysql', which"),
    ("mariadb+asyncmy://u:secret@db/app", "uses the driver 'mariadb+asyncmy', which"),
    ("sqlite+aiosqlite://", "is an in-memory SQLite database, which"),
    ("sqlite+aiosqlite:///:memory:", "is an in-memory SQLite database, which"),
]


@pytest.mark.parametrize("scheme", ["mariadb+asyncmy", "postgresql+psycopg_async", "mssql+aioodbc", "oracle+oracledb"])
def test_an_unsupported_driver_is_a_config_error_naming_it(scheme: str) -> None:
    url = f"{scheme}://u:secret@db/app"
    with pytest.raises(ConfigError) as info:
        PoolSettings().create_async_engine(url)
    assert str(info.value) == (
        f"url='{scheme}://u:***@db/app' uses the driver {scheme!r}, which asgi_dbpool does not support; use one of "
        f"{SUPPORTED}."
    )
    variable = re.escape(f"ASYNC_DATABASE_URL='{scheme}://u:***@db/app' uses the unsupported scheme {scheme!r};")
    with pytest.raises(ConfigError, match=f"^{variable}"):
        PoolSettings.from_env({"ASYNC_DATABASE_URL": url})


def test_in_memory_sqlite_and_pgbouncer_on_mysql_are_config_errors() -> None:
    with pytest.raises(ConfigError) as info:
        PoolSettings().create_async_engine("sqlite+aiosqlite://")
    assert str(info.value) == (
        "url='sqlite+aiosqlite://' is an in-memory SQLite database, which lives in one connection and has no pool to "
        "size; use a file: sqlite+aiosqlite:///path/app.db."
    )
    settings = PoolSettings.from_env({"DB_PGBOUNCER": "transaction", "ASYNC_DATABASE_URL": "mysql+aiomysql://u:p@h/d"})
    with pytest.raises(ConfigError) as info:
        settings.create_async_engine()
    assert str(info.value) == (
        "pgbouncer='transaction' (DB_PGBOUNCER) is for PostgreSQL, but the engine's URL is "
        "'mysql+aiomysql://u:***@h/d'; unset it."
    )


@pytest.mark.parametrize(("url", "said"), REFUSED_ENGINES)
async def test_the_middleware_refuses_an_engine_it_cannot_close_at_construction(url: str, said: str) -> None:
    """The same rule and sentence as PoolSettings (one check): before, such an engine was taken without a word and
    its connections were left to the garbage collector at shutdown (asyncmy: AttributeError in the shutdown)."""
    engine = create_async_engine(url)
    good = create_async_engine("sqlite+aiosqlite:///unused.db")  # never connected
    try:
        with pytest.raises(ConfigError) as info:
            DBPoolMiddleware(Starlette(), engine)
        masked = mask_url(engine.url)
        assert str(info.value).startswith(f"engine 'default' url={masked!r} {said}")
        if "driver" in said:
            assert str(info.value).endswith(f"which asgi_dbpool does not support; use one of {SUPPORTED}.")
        else:
            assert str(info.value).endswith("has no pool to size; use a file: sqlite+aiosqlite:///path/app.db.")
        assert "secret" not in str(info.value)
        with pytest.raises(ConfigError, match=r"^engine 'reports' url="):  # by its name in a mapping
            DBPoolMiddleware(Starlette(), {"primary": good, "reports": engine})
        with pytest.raises(ConfigError, match=r"^url="):  # PoolSettings says the same of the URL
            PoolSettings().create_async_engine(url)
        DBPoolMiddleware(Starlette(), good)  # the control: a supported engine is taken
    finally:
        await engine.dispose()
        await good.dispose()


async def test_the_middleware_refuses_an_async_drivers_engine_as_a_sync_one(tmp_path: Path) -> None:
    """An AsyncEngine's sync_engine given as a legacy engine would fail the startup ping with MissingGreenlet (and
    leave a coroutine never awaited); a sync engine on any sync driver is taken (the middleware only disposes of it,
    in a thread)."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    other = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}")
    legacy = create_engine(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        with pytest.raises(ConfigError) as info:
            DBPoolMiddleware(Starlette(), engine, sync_engines=[legacy, other.sync_engine])
        assert str(info.value) == (
            f"sync_engines[1] url={mask_url(other.url)!r} uses the async driver 'sqlite+aiosqlite'; pass its "
            "AsyncEngine as engine= (a mapping of names to engines takes several) instead."
        )
        app = DBPoolMiddleware(Starlette(), engine, sync_engines=iter([legacy]))  # any iterable, as before
        async with LifespanManager(app):
            assert [t.name for t in app.all_trackers()] == ["default", "sync:0"]
    finally:
        await engine.dispose()
        await other.dispose()
        legacy.dispose()


def test_database_url_keeps_an_async_driver_and_gives_plain_postgresql_asyncpg() -> None:
    def url(raw: str) -> str:
        return PoolSettings.from_env({"DATABASE_URL": raw}).async_url().drivername

    assert url("postgresql://u@h/d") == "postgresql+asyncpg"
    assert url("postgresql+psycopg2://u@h/d") == "postgresql+asyncpg"
    assert url("postgresql+psycopg://u@h/d") == "postgresql+psycopg"  # psycopg 3 is async itself
    assert url("mysql+aiomysql://u@h/d") == "mysql+aiomysql"
    assert url("mysql+asyncmy://u@h/d") == "mysql+asyncmy"
    assert url("sqlite+aiosqlite:///x.db") == "sqlite+aiosqlite"
