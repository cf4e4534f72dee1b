"""The shutdown's clock (one ``shutdown_timeout`` split into phase deadlines) and its last step: closing the
engines' connections while the loop still runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any

from ..base.describe import describe_task, one_line
from ..base.records import fields
from ..pool.tracker import PoolTracker

logger = logging.getLogger("asgi_dbpool")

#: Absolute phase deadlines, as shares of ``shutdown_timeout`` from the start of the shutdown: time left over
#: by one phase flows to the next, and an overrun in one still leaves the later phases their share.
DRAIN_SHARE = 0.5  # WebSockets and in-flight requests
APP_SHARE = 0.8  # background tasks and the wrapped app's own shutdown
# the rest, up to 1.0, is kept for reclaiming and closing connections
#: Budget for the forced path (the server cancelled the lifespan without a shutdown message).
FORCE_EXIT_BUDGET = 5.0
#: Seconds the tasks still holding connections get to stop after their cancellation (a rollback, a close): a
#: little more than the 2 s SQLAlchemy gives asyncpg to close a connection it invalidates (a cancelled query).
HOLDERS_TIMEOUT = 2.5
#: Seconds one connection gets to close gracefully (Terminate, then the server closes) before it is aborted; a
#: database that answers closes one in a few milliseconds.
CONNECTION_CLOSE_TIMEOUT = 0.5
#: Seconds the cancelled holders get to finish once their connections were closed under them.
REAP_TIMEOUT = 0.5
#: Seconds a server may take to accept a close frame at shutdown before the handler is interrupted anyway.
CLOSE_FRAME_TIMEOUT = 1.0


class ShutdownClock:
    """``shutdown_timeout`` split into absolute phase deadlines; each overrun is named in one WARNING."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        loop = asyncio.get_running_loop()
        self.started = loop.time()
        self.drain_deadline = self.started + seconds * DRAIN_SHARE
        self.app_deadline = self.started + seconds * APP_SHARE
        self.deadline = self.started + seconds

    def elapsed(self) -> float:
        return asyncio.get_running_loop().time() - self.started

    def left(self, deadline: float) -> float:
        return max(deadline - asyncio.get_running_loop().time(), 0.0)

    async def wait(self, awaitable: Awaitable[Any], what: str, deadline: float, still_running: Any = None) -> bool:
        """Wait for ``awaitable`` until ``deadline``; on overrun log a WARNING naming ``what``."""
        try:
            async with asyncio.timeout_at(deadline):
                await awaitable
            return True
        except TimeoutError:
            detail = still_running() if callable(still_running) else ""
            logger.warning(
                "shutdown budget (shutdown_timeout=%.1fs) ran out waiting for %s%s; moving on",
                self.seconds,
                what,
                f"; still running: {detail}" if detail else "",
                extra=fields("overrun", waiting_for=what, still_running=detail, budget=self.seconds),
            )
            return False

    async def cancel_and_wait(self, tasks: Iterable[asyncio.Task[Any]], what: str, deadline: float) -> int:
        """Cancel ``tasks`` and wait for them to finish; return how many there were.

        A task already being cancelled (``asyncio.run`` cancels every task at a forced exit) is only waited
        for: a second cancellation would interrupt the graceful connection close its first one started.
        """
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            if not task.cancelling():
                task.cancel()
        if pending:
            await self.wait(
                asyncio.wait(pending),
                what,
                deadline,
                lambda: ", ".join(describe_task(t) for t in pending if not t.done()),
            )
        return len(pending)


async def close_engines(trackers: Sequence[PoolTracker], clock: ShutdownClock, level: int = logging.INFO) -> None:
    """Refuse checkouts, cancel the tasks still holding connections, close every connection, dispose all engines.

    Checkouts are refused first: a task that is not holding a connection at the moment of the scan must not
    take one from the pool while it is being disposed (its query would be cut when the process exits).
    Every connection is then closed at once, each gracefully for at most :data:`CONNECTION_CLOSE_TIMEOUT`: a
    database that stopped answering costs that, not the budget, and one WARNING says so.
    ``level`` is that of the progress lines (DEBUG after a failed startup, which the server reports in one line).
    """
    me = asyncio.current_task()
    for tracker in trackers:
        tracker.refuse_checkouts()
    owners = set().union(*(t.owners(me) for t in trackers))
    if owners:
        serving = {task: route for tracker in trackers for task, route in tracker.serving().items()}
        described = sorted(describe_task(t) + (f" serving {serving[t]}" if t in serving else "") for t in owners)
        names = ", ".join(described)
        logger.log(
            level,
            "cancelling %d task(s) still holding connections: %s",
            len(owners),
            names,
            extra=fields("holders", tasks=described),
        )
        # At most half of what is left (the rest is for closing connections), and no more than HOLDERS_TIMEOUT:
        # a holder stuck on a database that stopped answering is freed by closing its connection below.
        halfway = clock.deadline - clock.left(clock.deadline) / 2
        loop = asyncio.get_running_loop()
        until = min(halfway, loop.time() + HOLDERS_TIMEOUT)
        stopping = asyncio.ensure_future(clock.cancel_and_wait(owners, "tasks holding connections", until))
        await asyncio.wait([stopping], timeout=CONNECTION_CLOSE_TIMEOUT)
        if not stopping.done():  # a cancelled query's connection may be closing on a database that does not answer
            for tracker in trackers:
                tracker.abort_closing()
        await stopping
        await _settle(trackers, owners, clock)
    try:
        async with asyncio.timeout_at(clock.deadline):
            seconds = min(CONNECTION_CLOSE_TIMEOUT, clock.left(clock.deadline))
            aborted = await asyncio.gather(*(tracker.close_connections(seconds) for tracker in trackers))
            if sum(aborted):
                logger.warning(
                    "the database did not answer within %.1fs at shutdown: %s connection(s) closed on "
                    "our side without its acknowledgement (it ends them when it notices, or at its idle timeout)",
                    seconds,
                    " + ".join(f"{t.name}={n}" for t, n in zip(trackers, aborted, strict=True) if n),
                    extra=fields(
                        "silent_database",
                        seconds=seconds,
                        aborted={t.name: n for t, n in zip(trackers, aborted, strict=True) if n},
                    ),
                )
            leaks = [report for tracker in trackers for report in await tracker.close_leaks()]
            results = await asyncio.gather(*(tracker.dispose() for tracker in trackers), return_exceptions=True)
            await _reap(owners)
    except TimeoutError:
        logger.warning(
            "shutdown budget (shutdown_timeout=%.1fs) ran out closing connections; still open: %s",
            clock.seconds,
            ", ".join(f"{t.name}={t.snapshot()['checked_in'] + len(t.checkouts)}" for t in trackers),
            extra=fields("overrun", waiting_for="closing connections", budget=clock.seconds),
        )
        return
    for tracker, result in zip(trackers, results, strict=True):
        if isinstance(result, BaseException):
            logger.warning(
                "engine %r: dispose failed: %s", tracker.name, one_line(result), extra=fields("dispose", tracker.name)
            )
    logger.log(
        level,
        "%d engine(s) disposed; leaks: %s",
        len(trackers),
        f"{len(leaks)} closed (see warnings above)" if leaks else "none",
        extra=fields("dispose", engines=len(trackers), leaks=len(leaks)),
    )


async def _settle(trackers: Sequence[PoolTracker], holders: set[asyncio.Task[Any]], clock: ShutdownClock) -> None:
    """Give the connections of the cancelled holders up to CONNECTION_CLOSE_TIMEOUT to come back to the pool.

    A holder can end before its connection is back: SQLAlchemy finishes a cancelled ``AsyncSession``'s close in a
    task of its own (a rollback, then the checkin). Closed as a leak meanwhile, the connection would be taken
    from under that rollback (``got result for unknown protocol state``, logged by asyncio as never retrieved).
    """
    loop = asyncio.get_running_loop()
    until = min(loop.time() + CONNECTION_CLOSE_TIMEOUT, clock.deadline)
    while loop.time() < until and any(c.owner in holders for t in trackers for c in list(t.checkouts.values())):  # noqa: ASYNC110 - checkins arrive from the pool; a short poll, bounded
        await asyncio.sleep(0.005)


async def _reap(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Let cancelled holders whose connection was just closed under them finish, and take their errors: they were
    asked to stop, and an error nobody retrieves is logged as "Task exception was never retrieved"."""
    pending = [t for t in tasks if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=REAP_TIMEOUT)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()
