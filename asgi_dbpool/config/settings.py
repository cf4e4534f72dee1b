"""Pool settings read from the ``DB_*`` environment variables, with the report's profile defaults."""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.engine import URL, make_url

from ..pool.tracker import PoolTracker
from .drivers import SUPPORTED, check_url, default_pool_class, mysql_query_timeout, query_timeout_options
from .options import DEFAULT_STATS_PATH, MiddlewareOptions, Options
from .parse import (
    ASYNC_DRIVERS,
    MAX_SECONDS,
    MAX_WORKERS,
    SYNC_DRIVERS,
    ConfigError,
    boolean,
    environment_name,
    mask_url,
    pgbouncer_mode,
    seconds,
    url_value,
    whole,
    workers_value,
)

__all__ = ["ConfigError", "PoolSettings", "mask_url", "workers_value"]

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine


logger = logging.getLogger("asgi_dbpool")

_E = TypeVar("_E", bound="Engine | AsyncEngine")


#: The PgBouncer pooling mode of engines built by ``PoolSettings.create_async_engine`` with ``pgbouncer`` set.
PGBOUNCER_MODES: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()

#: Sync PostgreSQL drivers on libpq, which take ``-c statement_timeout=...`` in the ``options`` connect argument.
LIBPQ = ("psycopg2", "psycopg")


def _unique_statement_name() -> str:
    return f"__asyncpg_{uuid.uuid4().hex}__"


#: (production, development) defaults, from the problem report's table.
PROFILES: dict[str, dict[str, Any]] = {
    "production": {"pool_size": 30, "max_overflow": 40, "pool_timeout": 30.0, "pool_recycle": 1800},
    "development": {"pool_size": 10, "max_overflow": 20, "pool_timeout": 30.0, "pool_recycle": 3600},
}
COMMON_DEFAULTS: dict[str, Any] = {
    "pool_pre_ping": True,
    "query_timeout": 30.0,
    "leak_threshold": 0.0,
    "retry_after": 1,
    "max_pending": 0,
    "pgbouncer": None,
    "pgbouncer_pool_size": 0,
    "workers": 0,
    "hosts": 1,
}


#: The environment variables ``PoolSettings.from_env`` reads (besides ENVIRONMENT): variable -> (field, parser).
ENV_READERS: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "DB_POOL_SIZE": ("pool_size", lambda n, v: whole(n, v, minimum=1)),
    "DB_MAX_OVERFLOW": ("max_overflow", lambda n, v: whole(n, v, minimum=0)),
    "DB_POOL_TIMEOUT": ("pool_timeout", lambda n, v: seconds(n, v, allow_zero=False)),
    "DB_POOL_RECYCLE": ("pool_recycle", lambda n, v: whole(n, v, minimum=0, maximum=int(MAX_SECONDS))),
    "DB_POOL_PRE_PING": ("pool_pre_ping", boolean),
    "DB_QUERY_TIMEOUT": ("query_timeout", lambda n, v: seconds(n, v, allow_zero=True)),
    "DB_POOL_LEAK_THRESHOLD": ("leak_threshold", lambda n, v: seconds(n, v, allow_zero=True)),
    "DB_POOL_RETRY_AFTER": ("retry_after", lambda n, v: whole(n, v, minimum=0, maximum=3600)),
    "DB_POOL_MAX_PENDING": ("max_pending", lambda n, v: whole(n, v, minimum=0)),
    "DB_PGBOUNCER": ("pgbouncer", pgbouncer_mode),
    "DB_PGBOUNCER_POOL_SIZE": ("pgbouncer_pool_size", lambda n, v: whole(n, v, minimum=0)),
    "WEB_CONCURRENCY": ("workers", workers_value),
    "DB_HOSTS": ("hosts", lambda n, v: whole(n, v, minimum=1, maximum=MAX_WORKERS)),
    "DB_POOL_STATS_PATH": ("stats_path", lambda n, v: None if v.strip().lower() in ("off", "") else v.strip()),
    "DB_POOL_STATS_TOKEN": ("stats_token", lambda n, v: v.strip() or None),
    "DB_POOL_MONITOR_INTERVAL": ("monitor_interval", lambda n, v: seconds(n, v, allow_zero=False)),
    "DB_POOL_SHUTDOWN_TIMEOUT": ("shutdown_timeout", lambda n, v: seconds(n, v, allow_zero=False)),
    "DB_POOL_STARTUP_TIMEOUT": ("startup_timeout", lambda n, v: seconds(n, v, allow_zero=False)),
    "ASYNC_DATABASE_URL": ("async_database_url", lambda n, v: url_value(n, v, ASYNC_DRIVERS)),
    "DATABASE_URL": ("database_url", lambda n, v: url_value(n, v, ASYNC_DRIVERS | SYNC_DRIVERS)),
}


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class PoolSettings:
    """Pool options, validated; build them with :meth:`from_env` or directly."""

    environment: str = "development"
    pool_size: int = PROFILES["development"]["pool_size"]
    max_overflow: int = PROFILES["development"]["max_overflow"]
    pool_timeout: float = PROFILES["development"]["pool_timeout"]
    pool_recycle: int = PROFILES["development"]["pool_recycle"]  # 0 turns recycling off
    pool_pre_ping: bool = True
    query_timeout: float = 30.0  # in the driver's own terms (see create_async_engine); 0 turns it off
    leak_threshold: float = 0.0  # seconds a checkout may last before it is reported; 0 turns it off
    retry_after: int = 1  # the Retry-After of a 503 for an exhausted pool
    max_pending: int = 0  # fail a checkout at once when this many tasks already wait; 0 turns it off
    pgbouncer: str | None = None  # "transaction" with PgBouncer in transaction mode; None: not said (detected)
    pgbouncer_pool_size: int = 0  # PgBouncer's server connections for this database/user; 0 = not known
    workers: int = 0  # workers per host, for the budget check; 0 = unset (the middleware reads WEB_CONCURRENCY)
    hosts: int = 1  # hosts running this app against the same database, for the budget check
    stats_path: str | None = DEFAULT_STATS_PATH  # where the pool endpoints are; None: no endpoints
    stats_token: str | None = None  # a bearer token the pool endpoints require; None: open
    monitor_interval: float = 60.0  # seconds between two looks of the pool monitor
    shutdown_timeout: float = 10.0  # the budget of the whole shutdown
    startup_timeout: float = 10.0  # the bound of each engine's startup ping
    async_database_url: str | None = None
    database_url: str | None = None

    def __post_init__(self) -> None:
        # Typed values go through the same rules as the environment; the middleware's own options through the
        # middleware's (one Options check, so both ways give the same ConfigError).
        whole("pool_size", self.pool_size, minimum=1)
        whole("max_overflow", self.max_overflow, minimum=0)
        whole("pool_recycle", self.pool_recycle, minimum=0, maximum=int(MAX_SECONDS))
        seconds("pool_timeout", self.pool_timeout, allow_zero=False)
        seconds("query_timeout", self.query_timeout, allow_zero=True)
        Options(**self.middleware_options())
        if self.async_database_url is not None:
            url_value("async_database_url", self.async_database_url, ASYNC_DRIVERS)
        if self.database_url is not None:
            url_value("database_url", self.database_url, ASYNC_DRIVERS | SYNC_DRIVERS)

    @property
    def is_production(self) -> bool:
        return self.environment == "production"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PoolSettings:
        """Read ``ENVIRONMENT``, ``DB_*``, ``ASYNC_DATABASE_URL`` and ``DATABASE_URL``.

        Unset variables take the ``ENVIRONMENT`` profile's default (``production`` or any other
        name for development); a set but malformed one raises :class:`ConfigError`.
        """
        env = os.environ if environ is None else environ
        environment = environment_name(env["ENVIRONMENT"]) if "ENVIRONMENT" in env else "development"
        values: dict[str, Any] = {
            **COMMON_DEFAULTS,
            **PROFILES["production" if environment == "production" else "development"],
        }
        for variable, (field, read) in ENV_READERS.items():
            if variable in env:
                values[field] = read(variable, env[variable])
        return cls(environment=environment, **values)

    def middleware_options(self) -> MiddlewareOptions:
        """The ``DBPoolMiddleware`` options these settings stand for: ``DBPoolMiddleware(app, engine, **it)``."""
        return MiddlewareOptions(
            leak_threshold=self.leak_threshold or None,
            retry_after=self.retry_after,
            max_pending=self.max_pending or None,
            workers=self.workers or None,
            hosts=self.hosts,
            pgbouncer=self.pgbouncer,  # None (DB_PGBOUNCER unset): a pooler found at startup is reported
            pgbouncer_pool_size=self.pgbouncer_pool_size or None,
            stats_path=self.stats_path,
            stats_token=self.stats_token,
            monitor_interval=self.monitor_interval,
            shutdown_timeout=self.shutdown_timeout,
            startup_timeout=self.startup_timeout,
            production=self.is_production,
        )

    def __repr__(self) -> str:
        fields = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("database_url") and value is not None:
                value = mask_url(value)  # the password never reaches a log line or a traceback
            elif field.name == "stats_token" and value is not None:
                value = "***"
            fields.append(f"{field.name}={value!r}")
        return f"PoolSettings({', '.join(fields)})"

    def engine_options(self) -> dict[str, Any]:
        """The ``create_engine`` pool options these settings stand for."""
        return {
            "pool_size": self.pool_size,
            "max_overflow": self.max_overflow,
            "pool_timeout": self.pool_timeout,
            "pool_recycle": self.pool_recycle or -1,
            "pool_pre_ping": self.pool_pre_ping,
        }

    def async_url(self) -> URL:
        """``ASYNC_DATABASE_URL``, else ``DATABASE_URL``; a PostgreSQL URL without an async driver gets asyncpg."""
        raw = self.async_database_url or self.database_url
        if raw is None:
            raise ConfigError(
                "No database URL is set; set ASYNC_DATABASE_URL (or DATABASE_URL) to postgresql+asyncpg://..."
            )
        url = make_url(raw)
        if url.drivername not in SUPPORTED:  # postgresql, postgres, or a sync PostgreSQL driver (validated)
            url = url.set(drivername="postgresql+asyncpg")
        return url

    def create_async_engine(self, url: str | URL | None = None, **kwargs: Any) -> AsyncEngine:
        """Build an :class:`AsyncEngine` with these pool options and ``query_timeout`` in the driver's own terms.

        ``query_timeout`` is asyncpg's ``command_timeout`` (the client cancels the query); with psycopg, the session's
        ``statement_timeout`` (the server cancels it); with aiomysql and asyncmy, MariaDB's ``max_statement_time``
        (MySQL's ``max_execution_time``, SELECTs only) set on each new connection; with aiosqlite, sqlite3's
        ``timeout``, the wait for a lock (SQLite has no query timeout). Any other driver is a :class:`ConfigError`
        naming it, here and in ``DBPoolMiddleware``.

        With ``pgbouncer="transaction"``: PgBouncer in transaction mode hands each transaction to any server
        connection, but a prepared statement lives on the one server connection that prepared it. So asyncpg's
        statement cache (``statement_cache_size=0``), its fixed statement names (a unique name each time) and
        SQLAlchemy's own prepared-statement cache (``prepared_statement_cache_size=0``, a dialect option read
        from the URL) must all be off; with any one left on, concurrent queries fail with
        ``prepared statement "__asyncpg_stmt_N__" does not exist`` (or ``already exists``). Measured against
        PgBouncer 1.18 with 2 server connections and 40 tasks: about 40% of queries fail with a plain engine,
        as many with only asyncpg's two settings, none with all three. With any PgBouncer mode the engine is
        recorded, so the middleware's budget check counts its connections as PgBouncer's clients.
        """
        from sqlalchemy.ext.asyncio import create_async_engine

        target = self.async_url() if url is None else make_url(url)
        variable = "ASYNC_DATABASE_URL" if url is None and self.async_database_url else "DATABASE_URL"
        variable = "url" if url is not None else variable
        check_url(target, variable)  # the middleware refuses an engine by the same rule
        if self.pgbouncer in ("session", "transaction") and target.get_backend_name() != "postgresql":
            raise ConfigError(
                f"pgbouncer={self.pgbouncer!r} (DB_PGBOUNCER) is for PostgreSQL, but the engine's URL is "
                f"{mask_url(target)!r}; unset it."
            )
        connect_args: dict[str, Any] = dict(kwargs.pop("connect_args", {}))
        pgbouncer = self.pgbouncer in ("session", "transaction")
        if not query_timeout_options(target, self.query_timeout, connect_args, pgbouncer):
            logger.warning(
                "DB_QUERY_TIMEOUT=%g is not applied: psycopg can only set statement_timeout as a startup option, "
                "which PgBouncer refuses; set it on the server for the role instead: ALTER ROLE ... SET "
                "statement_timeout = '%gs'",
                self.query_timeout,
                self.query_timeout,
            )
        if self.pgbouncer == "transaction" and target.get_driver_name() == "asyncpg":
            target = target.update_query_dict({"prepared_statement_cache_size": "0"})
            connect_args.setdefault("statement_cache_size", 0)
            connect_args.setdefault("prepared_statement_name_func", _unique_statement_name)
        elif self.pgbouncer == "transaction":
            connect_args.setdefault("prepare_threshold", None)  # psycopg's server-side prepared statements: off
        options = {**self.engine_options(), "connect_args": connect_args, **kwargs}
        engine = _build_tracked(create_async_engine, target, True, options)
        if target.get_backend_name() == "mysql":
            mysql_query_timeout(engine.sync_engine, self.query_timeout)
        if self.pgbouncer is not None:
            PGBOUNCER_MODES[engine.sync_engine] = self.pgbouncer  # what the middleware's budget check reads
        return engine

    def create_sync_engine(self, url: str | URL | None = None, **kwargs: Any) -> Engine:
        """Build the legacy (deprecated) sync engine from ``DATABASE_URL``; prefer the async engine."""
        from sqlalchemy import create_engine

        raw = url if url is not None else self.database_url
        if raw is None:
            raise ConfigError("DATABASE_URL is not set; the legacy sync engine needs postgresql+psycopg2://...")
        target = make_url(raw)
        if target.drivername == "postgres":  # Heroku-style alias SQLAlchemy no longer accepts
            target = target.set(drivername="postgresql")
        if target.drivername in ASYNC_DRIVERS - SYNC_DRIVERS:
            raise ConfigError(f"DATABASE_URL={mask_url(target)!r} names an async driver; use postgresql+psycopg2://...")
        connect_args: dict[str, Any] = dict(kwargs.pop("connect_args", {}))
        if self.query_timeout and target.get_backend_name() == "postgresql" and target.get_driver_name() in LIBPQ:
            connect_args.setdefault("options", f"-c statement_timeout={int(self.query_timeout * 1000)}")
        options = {**self.engine_options(), "connect_args": connect_args, **kwargs}
        return _build_tracked(create_engine, target, False, options)


def _build_tracked(create: Callable[..., _E], url: URL, is_async: bool, options: dict[str, Any]) -> _E:
    """``create(url, **options)`` with a tracked ``poolclass=``: the engine's pools report to its tracker from the
    first on (the middleware finds that tracker and names it). A ``pool=`` the caller built is left as it is."""
    if "pool" in options:
        return create(url, **options)
    tracker = PoolTracker(None, "default")
    base = options.pop("poolclass", None) or default_pool_class(url, is_async)
    engine = create(url, poolclass=tracker.pool_class(base), **options)
    tracker.attach(engine)
    return engine
