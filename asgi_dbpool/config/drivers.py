"""What each supported driver needs when an engine is built: its URL scheme, and its query timeout in its own terms.
(What differs once the engine runs is :mod:`asgi_dbpool.pool.dialects`.)"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.pool import Pool

from .parse import ConfigError, mask_url

#: The async URL schemes asgi_dbpool supports, each tested against a real database.
SUPPORTED = ("postgresql+asyncpg", "postgresql+psycopg", "mysql+aiomysql", "mysql+asyncmy", "sqlite+aiosqlite")


def check_url(url: URL, where: str) -> None:
    """Raise :class:`ConfigError` for an async URL whose connections asgi_dbpool cannot close, time out or size: a
    driver outside :data:`SUPPORTED`, or an in-memory SQLite. ``where`` names the setting or the engine."""
    if url.drivername not in SUPPORTED:
        raise ConfigError(
            f"{where}={mask_url(url)!r} uses the driver {url.drivername!r}, which asgi_dbpool does not support; use "
            f"one of {list(SUPPORTED)}."
        )
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise ConfigError(
            f"{where}={mask_url(url)!r} is an in-memory SQLite database, which lives in one connection and has no "
            "pool to size; use a file: sqlite+aiosqlite:///path/app.db."
        )


def default_pool_class(url: URL, is_async: bool) -> type[Pool]:
    """The pool class SQLAlchemy's ``create_engine``/``create_async_engine`` would choose for ``url`` (what a
    tracked ``poolclass=`` subclasses): the dialect's own answer, through the public dialect interface."""
    dialect_cls = url.get_dialect()
    if is_async:
        dialect_cls = dialect_cls.get_async_dialect_cls(url)  # psycopg: one name, a sync and an async dialect
    return dialect_cls().get_dialect_pool_class(url)


def check_engine(engine: Any, name: str) -> None:
    """:func:`check_url` for an engine given to the middleware by ``name``."""
    check_url(engine.url, f"engine {name!r} url")


def check_sync_engine(engine: Any, index: int) -> Any:
    """A ``sync_engines=`` engine, refused when it is the sync side of an async driver: its connections can be
    used and closed only from the event loop (its startup ping fails with MissingGreenlet), so it is no legacy
    engine. Sync drivers are not otherwise restricted: the middleware only disposes of them, in a thread."""
    if engine.dialect.is_async:
        raise ConfigError(
            f"sync_engines[{index}] url={mask_url(engine.url)!r} uses the async driver {engine.url.drivername!r}; "
            "pass its AsyncEngine as engine= (a mapping of names to engines takes several) instead."
        )
    return engine


# -- the query timeout, in each driver's own terms ---------------------------------------------------------------------


def query_timeout_options(url: URL, seconds: float, connect_args: dict[str, Any], pgbouncer: bool) -> bool:
    """Put ``seconds`` (0: off) into ``connect_args`` the way the driver of ``url`` understands a query timeout;
    False when it cannot be (psycopg through PgBouncer)."""
    driver = url.get_driver_name()
    if driver == "asyncpg":
        connect_args.setdefault("command_timeout", seconds or None)  # client side: cancels the query
    elif driver == "psycopg" and seconds:
        if pgbouncer:
            # PgBouncer refuses the startup option ("unsupported startup parameter: options"), and a SET would
            # land on whichever server connection runs it: only the server's own setting for the role works.
            return False
        # Server side: PostgreSQL cancels the statement (psycopg has no client-side query timeout).
        connect_args.setdefault("options", f"-c statement_timeout={round(seconds * 1000)}")
    elif driver == "aiosqlite":
        # SQLite has no query timeout; sqlite3's ``timeout`` bounds the wait for a lock another connection holds.
        connect_args.setdefault("timeout", seconds or 0.0)
    return True


def mysql_query_timeout(engine: Any, seconds: float) -> None:
    """MariaDB's ``max_statement_time`` (seconds) or MySQL's ``max_execution_time`` (milliseconds, SELECT only) on
    every new connection: the server's name for it is known only once the first connection saw the server."""
    if not seconds:
        return

    @event.listens_for(engine, "connect")
    def _set(dbapi_connection: Any, record: Any) -> None:  # runs after the dialect read the server version
        if engine.dialect.is_mariadb:
            statement = f"SET SESSION max_statement_time = {seconds:.6f}"
        else:
            statement = f"SET SESSION max_execution_time = {round(seconds * 1000)}"
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(statement)
        finally:
            cursor.close()
