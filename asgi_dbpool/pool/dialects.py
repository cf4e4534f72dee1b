"""What differs per database driver once an engine runs: the server settings the budget check reads, and how one of
its connections is closed (gracefully, else aborted) at shutdown. (Its URL scheme and its query timeout, set when an
engine is built, are :mod:`asgi_dbpool.config.drivers`.)

Supported and tested: ``postgresql+asyncpg``, ``postgresql+psycopg`` (psycopg 3, async), ``mysql+aiomysql`` and
``mysql+asyncmy`` (on MariaDB) and ``sqlite+aiosqlite``. The driver connection's own module picks the closing rules,
so they hold for an engine built any way, not only by :meth:`PoolSettings.create_async_engine`; an engine on any other
driver is refused (:func:`asgi_dbpool.config.drivers.check_url`, by the settings and the middleware alike).
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import text

#: The MySQL protocol drivers: COM_QUIT to close (``ensure_closed``), the transport alone to abort (``close``).
MYSQL_DRIVERS = ("aiomysql", "asyncmy")


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
