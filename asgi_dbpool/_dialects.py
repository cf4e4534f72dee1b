"""What differs per database driver: its URL scheme, its query timeout, the server settings the budget check reads,
and how one of its connections is closed (gracefully, else aborted) at shutdown.

Supported and tested: ``postgresql+asyncpg``, ``postgresql+psycopg`` (psycopg 3, async), ``mysql+aiomysql`` and
``mysql+asyncmy`` (on MariaDB) and ``sqlite+aiosqlite``. The driver connection's own module picks the closing rules,
so they hold for an engine built any way, not only by :meth:`PoolSettings.create_async_engine`; an engine on any other
driver is refused (:func:`check_url`, by the settings and the middleware alike).
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL

from ._parse import ConfigError, mask_url

#: The async URL schemes asgi_dbpool supports, each tested against a real database.
SUPPORTED = ("postgresql+asyncpg", "postgresql+psycopg", "mysql+aiomysql", "mysql+asyncmy", "sqlite+aiosqlite")
#: The MySQL protocol drivers: COM_QUIT to close (``ensure_closed``), the transport alone to abort (``close``).
MYSQL_DRIVERS = ("aiomysql", "asyncmy")


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


def driver_name(connection: Any) -> str:
    """The top-level module of a driver connection: ``asyncpg``, ``psycopg``, ``aiomysql``, ``asyncmy``,
    ``aiosqlite``."""
    return type(connection).__module__.partition(".")[0]


# -- closing one driver connection at shutdown ----------------------------------------------------------------------


def is_closed(connection: Any) -> bool:
    driver = driver_name(connection)
    if driver == "asyncpg":
        return bool(connection.is_closed())
    if driver == "aiosqlite":
        return connection._connection is None  # aiosqlite has no public flag; close() sets this to None
    if driver == "asyncmy":
        # Before asyncmy 0.2.18 close() (an abort) leaves it True; ensure_closed() then only closes (0.2.13+).
        return not connection.connected
    return bool(connection.closed)  # psycopg, aiomysql


async def close_gracefully(connection: Any, seconds: float) -> None:
    """The driver's polite goodbye (PostgreSQL's Terminate, MySQL's COM_QUIT, SQLite's close in its thread)."""
    driver = driver_name(connection)
    if driver == "asyncpg":
        await connection.close(timeout=seconds)  # asyncpg aborts the socket itself on its own timeout
    elif driver in MYSQL_DRIVERS:
        await connection.ensure_closed()  # COM_QUIT, then the socket; close() alone is what the server counts aborted
    else:
        await connection.close()  # psycopg: libpq's PQfinish sends Terminate without waiting; aiosqlite: its thread


def abort(connection: Any) -> None:
    """Close on our side at once, without waiting for the server."""
    driver = driver_name(connection)
    if driver == "asyncpg":
        connection.terminate()
    elif driver in MYSQL_DRIVERS:
        connection.close()  # the transport only, no COM_QUIT
    elif driver == "psycopg":
        connection.pgconn.finish()  # what close() does, without the async wrapper
    elif driver == "aiosqlite":
        # Ends its thread (a non-daemon one: left running, it holds the process at exit) once what is queued ran;
        # stop() from aiosqlite 0.22.1, _stop_running() before. sqlite3 closes the file when it is collected.
        (getattr(connection, "stop", None) or connection._stop_running)()


def abort_if_closing(connection: Any) -> None:
    """asyncpg only: a close SQLAlchemy started (a cancelled query's invalidation) waits up to 2 s for a server
    that may not answer; the others close without waiting for the server."""
    if driver_name(connection) == "asyncpg" and connection.is_closed():
        connection.terminate()  # a no-op once the close has finished


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


# -- server settings for the budget check and the advice -----------------------------------------------------------

_POSTGRESQL = text(
    "SELECT name, setting::int FROM pg_settings WHERE name IN ('max_connections', 'superuser_reserved_connections', "
    "'reserved_connections', 'idle_session_timeout', 'idle_in_transaction_session_timeout') "
    "UNION ALL SELECT 'backend_pid', pg_backend_pid()"
)
#: MySQL and MariaDB reserve no share of max_connections (one more is let in for an administrator).
_MYSQL = text("SELECT @@max_connections, @@wait_timeout")
#: The server setting after which it closes an idle session, per backend (named in the recycle advice).
IDLE_TIMEOUT_NAME = {"postgresql": "idle_session_timeout", "mysql": "wait_timeout", "mariadb": "wait_timeout"}


async def read_settings(conn: Any) -> dict[str, int] | None:
    """The server settings of the database behind ``conn`` (an AsyncConnection); None: it has no server (SQLite)."""
    backend = conn.dialect.name
    if backend == "postgresql":
        rows: dict[str, int] = {name: value for name, value in (await conn.execute(_POSTGRESQL)).all()}
        given = _given_pid((await conn.get_raw_connection()).driver_connection)
        return {
            "max_connections": rows["max_connections"],
            "superuser_reserved_connections": rows.get("superuser_reserved_connections", 0),
            "reserved_connections": rows.get("reserved_connections", 0),  # PostgreSQL 16+
            "idle_session_timeout_ms": rows.get("idle_session_timeout", 0),  # PostgreSQL 14+
            "idle_in_transaction_session_timeout_ms": rows.get("idle_in_transaction_session_timeout", 0),
            # A pooler (PgBouncer, pgcat, RDS Proxy...) gives its clients a process id of its own at connect time;
            # directly (or through a plain TCP proxy) it is the backend's own pg_backend_pid().
            "pooler": int(given is not None and given != rows["backend_pid"]),
        }
    if backend in ("mysql", "mariadb"):
        max_connections, wait_timeout = (await conn.execute(_MYSQL)).one()
        return {
            "max_connections": int(max_connections),
            "superuser_reserved_connections": 0,
            "reserved_connections": 0,
            "idle_session_timeout_ms": int(wait_timeout) * 1000,
            "idle_in_transaction_session_timeout_ms": 0,
            "pooler": 0,
        }
    return None


def _given_pid(connection: Any) -> int | None:
    """The process id the server (or a pooler) gave at connect time (PostgreSQL's BackendKeyData)."""
    driver = driver_name(connection)
    if driver == "asyncpg":
        return int(connection.get_server_pid())
    if driver == "psycopg":
        return int(connection.info.backend_pid)
    return None


async def wait_closed(connection: Any, seconds: float) -> bool:
    """Close one driver connection gracefully within ``seconds``; False when it had to be aborted."""
    if is_closed(connection):
        return True
    try:
        async with asyncio.timeout(seconds):
            await close_gracefully(connection, seconds)
        return True
    except Exception:  # timed out, or the server or the driver failed the close: the socket goes either way
        abort(connection)
        return False
