"""The checks of a startup: one round trip per engine, the server settings and the connection budget."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import text

from ..base.describe import one_line
from ..base.records import fields
from ..config.parse import mask_url
from ..observe.advice import Topology, budget_lines, read_server
from ..pool.tracker import PoolTracker

logger = logging.getLogger("asgi_dbpool")

#: Seconds a wrapped app that answered ``lifespan.startup.failed`` gets to return or raise (Starlette raises at
#: once): the middleware raises that exception in turn, as the bare app would.
APP_EXIT_TIMEOUT = 1.0


class StartupError(RuntimeError):
    """Startup cannot go on: a database is unreachable, or an engine is already managed (one line for the server)."""

    __module__ = "asgi_dbpool"  # tracebacks name the public class, not a private module


async def check_reachable(trackers: Sequence[PoolTracker], seconds: float) -> None:
    """One ``SELECT 1`` per engine, each bounded by ``seconds``; :class:`StartupError` names the first that fails."""
    for tracker in trackers:
        try:
            async with asyncio.timeout(seconds):
                await _ping(tracker)
        except Exception as exc:
            cause = f"timed out after {seconds:g}s" if isinstance(exc, TimeoutError) else one_line(exc)
            error = StartupError(
                f"asgi_dbpool: cannot reach database {tracker.name!r} at {mask_url(tracker.engine.url)}: {cause}"
            )
            error.__cause__ = exc  # for a debugger; the server is given the one line only
            error.__suppress_context__ = True
            raise error from None


async def check_budget(
    trackers: Sequence[PoolTracker], topology: Topology, pgbouncer_mode: Callable[[PoolTracker], str]
) -> None:
    """Read each server's settings, warn about an undeclared connection pooler, log the budget check."""
    for tracker in trackers:
        try:
            await read_server(tracker)
        except Exception as exc:  # advice and the budget check go without; nothing else depends on it
            logger.info(
                "could not read the server settings of %r (no budget check, no recycle advice): %s",
                tracker.name,
                one_line(exc),
            )
    for tracker in trackers:
        if pgbouncer_mode(tracker) == "unknown":
            logger.warning(
                "engine %r at %s goes through a connection pooler (the process id it was given at "
                "connect time is not the server's pg_backend_pid()) but DB_PGBOUNCER is not set: with PgBouncer's "
                "transaction pooling set DB_PGBOUNCER=transaction and build the engine with "
                "PoolSettings.create_async_engine(), or queries fail with 'prepared statement ... does not exist'; "
                "otherwise set DB_PGBOUNCER=session (or pass pgbouncer='session' to the middleware)",
                tracker.name,
                mask_url(tracker.engine.url),
                extra=fields("pooler", tracker.name),
            )
    for level, line in budget_lines(trackers, topology, pgbouncer_mode):
        logger.log(level, line, extra=fields("budget", workers=topology.workers, hosts=topology.hosts))


def pool_logger_names(trackers: Sequence[PoolTracker]) -> list[str]:
    names = []
    for tracker in trackers:
        lg: Any = tracker.engine.pool.logger
        names.append(getattr(lg, "logger", lg).name)
    return names


async def _ping(tracker: PoolTracker) -> None:
    if tracker.async_engine is not None:
        async with tracker.async_engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    else:

        def ping() -> None:
            with tracker.engine.connect() as conn:
                conn.execute(text("SELECT 1"))

        await asyncio.to_thread(ping)
