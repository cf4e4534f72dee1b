"""Startup: one round trip per engine, the server settings and the budget check, the filter, the monitors."""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from . import _logfilter
from ._advice import budget_lines, read_server
from ._guard import clear_shutting_down
from ._lifespan import one_line
from ._monitor import check_leaks
from ._settings import mask_url
from ._tracker import PoolTracker

if TYPE_CHECKING:
    from ._middleware import DBPoolMiddleware

logger = logging.getLogger("asgi_dbpool")


class StartupError(RuntimeError):
    """Startup cannot go on: a database is unreachable, or an engine is already managed (one line for the server)."""


def claim(mw: DBPoolMiddleware, *, strict: bool) -> None:
    """Make ``mw`` the owner of its engines' trackers, so its pool options (leak threshold, max_pending) apply.

    One engine has one owner at a time: a second middleware *running* on it would apply its own options and
    dispose the engine under the first at its shutdown. ``strict`` (at startup) refuses that; at construction a
    running owner keeps its options until this middleware starts.
    """
    for tracker in mw.all_trackers():
        owner = tracker.owner() if tracker.owner is not None else None
        if owner is not None and owner is not mw and owner.running:
            if not strict:
                return
            raise StartupError(
                f"asgi_dbpool: engine {tracker.name!r} at {mask_url(tracker.engine.url)} is already managed by "
                "another running DBPoolMiddleware; wrap the app once (one middleware per engine) or give each app "
                "its own engine"
            )
    for tracker in mw.all_trackers():
        tracker.owner = weakref.ref(mw)
        tracker.leak_threshold = mw.leak_threshold
        tracker.max_pending = mw.max_pending


async def startup(mw: DBPoolMiddleware) -> None:
    claim(mw, strict=True)
    clear_shutting_down()
    mw.shutting_down = False
    mw.server_stopping = False
    for tracker in mw.all_trackers():
        tracker.reopen()
    for tracker in mw.all_trackers():
        try:
            async with asyncio.timeout(mw.startup_timeout):
                await _ping(tracker)
        except Exception as exc:
            await _dispose_quietly(mw.all_trackers())
            cause = f"timed out after {mw.startup_timeout:g}s" if isinstance(exc, TimeoutError) else one_line(exc)
            raise StartupError(
                f"asgi_dbpool: cannot reach database {tracker.name!r} at {mask_url(tracker.engine.url)}: {cause}"
            ) from exc
    await check_budget(mw)
    if mw.install_log_filter:
        _logfilter.install(_pool_logger_names(mw.all_trackers()))
    mw._monitor_task = asyncio.create_task(mw.monitor.run(), name="asgi_dbpool: pool monitor")
    if mw.leak_threshold is not None:
        mw._leak_task = asyncio.create_task(watch_leaks(mw), name="asgi_dbpool: leak detection")
    mw.running = True
    logger.info("asgi_dbpool: %d engine(s) reachable; pool monitor started", len(mw.all_trackers()))


async def check_budget(mw: DBPoolMiddleware) -> None:
    for tracker in mw.trackers:
        try:
            await read_server(tracker)
        except Exception as exc:  # advice and the budget check go without; nothing else depends on it
            logger.info(
                "asgi_dbpool: could not read the server settings of %r (no budget check, no recycle advice): %s",
                tracker.name,
                one_line(exc),
            )
    for tracker in mw.trackers:
        if mw.pgbouncer_mode(tracker) == "unknown":
            logger.warning(
                "asgi_dbpool: engine %r at %s goes through a connection pooler (the process id it was given at "
                "connect time is not the server's pg_backend_pid()) but DB_PGBOUNCER is not set: with PgBouncer's "
                "transaction pooling set DB_PGBOUNCER=transaction and build the engine with "
                "PoolSettings.create_async_engine(), or queries fail with 'prepared statement ... does not exist'; "
                "otherwise pass pgbouncer='session' (or 'off') to the middleware",
                tracker.name,
                mask_url(tracker.engine.url),
            )
    for level, line in budget_lines(mw.trackers, mw.topology, mw.pgbouncer_mode):
        logger.log(level, line)


async def watch_leaks(mw: DBPoolMiddleware) -> None:
    assert mw.leak_threshold is not None
    tick = min(mw.leak_threshold / 2, 1.0)
    while True:
        await asyncio.sleep(tick)
        for tracker in mw.all_trackers():
            check_leaks(tracker)


async def _ping(tracker: PoolTracker) -> None:
    if tracker.async_engine is not None:
        async with tracker.async_engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    else:

        def ping() -> None:
            with tracker.engine.connect() as conn:
                conn.execute(text("SELECT 1"))

        await asyncio.to_thread(ping)


async def _dispose_quietly(trackers: list[PoolTracker]) -> None:
    for tracker in trackers:
        try:
            if tracker.async_engine is not None:
                await tracker.async_engine.dispose()
            else:
                await asyncio.to_thread(tracker.engine.dispose)
        except Exception as exc:  # the database is down; nothing is open to close
            logger.debug("asgi_dbpool: dispose after failed startup: %r", exc)


def _pool_logger_names(trackers: list[PoolTracker]) -> list[str]:
    names = []
    for tracker in trackers:
        lg: Any = tracker.engine.pool.logger
        names.append(getattr(lg, "logger", lg).name)
    return names
