"""The ordered shutdown: every step bounded by one budget, all of it while the loop still runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any

from ._connections import CLOSE_FRAME_TIMEOUT
from ._lifespan import InnerLifespan, describe_task, one_line

if TYPE_CHECKING:
    from ._middleware import DBPoolMiddleware

logger = logging.getLogger("asgi_dbpool")

#: Absolute phase deadlines, as shares of ``shutdown_timeout`` from the start of the shutdown: time left over
#: by one phase flows to the next, and an overrun in one still leaves the later phases their share.
DRAIN_SHARE = 0.5  # WebSockets and in-flight requests
APP_SHARE = 0.8  # background tasks and the wrapped app's own shutdown
# the rest, up to 1.0, is kept for reclaiming and closing connections
#: Budget for the forced path (the server cancelled the lifespan without a shutdown message).
FORCE_EXIT_BUDGET = 5.0


class Budget:
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
                "asgi_dbpool: shutdown budget (shutdown_timeout=%.1fs) ran out waiting for %s%s; moving on",
                self.seconds,
                what,
                f"; still running: {detail}" if detail else "",
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


async def shutdown(mw: DBPoolMiddleware, inner: InnerLifespan) -> tuple[str, str]:
    """Run steps 1-7 of the shutdown; return the wrapped app's shutdown outcome for the answer (step 8)."""
    budget = Budget(mw.shutdown_timeout)
    mw._enter_shutdown()  # 1. the flag first
    logger.info("asgi_dbpool: shutdown flag set (budget %.1fs)", mw.shutdown_timeout)

    # 2. WebSockets: close (idempotently) and wait for their handlers, which usually hold sessions.
    open_sockets = len(mw.connections.websockets)
    closed, pending = await mw.connections.close_websockets(budget.drain_deadline)
    if pending:
        logger.warning(
            "asgi_dbpool: the server did not take the close frame of %d WebSocket(s) within %.1fs; their handlers "
            "were interrupted anyway",
            pending,
            CLOSE_FRAME_TIMEOUT,
        )
    await budget.wait(
        mw.connections.wait_websockets(),
        "WebSocket handlers",
        budget.drain_deadline,
        lambda: f"{len(mw.connections.websockets)} handler(s)",
    )
    logger.info(
        "asgi_dbpool: %d WebSocket(s) closed (%d were open, %d already closed by the server)",
        closed,
        open_sockets,
        open_sockets - closed - pending,
    )

    # 3. In-flight HTTP requests.
    in_flight = mw.connections.http_in_flight
    await budget.wait(
        mw.connections.wait_http(),
        "in-flight HTTP requests",
        budget.drain_deadline,
        lambda: f"{mw.connections.http_in_flight} request(s)",
    )
    logger.info("asgi_dbpool: %d in-flight request(s) drained", in_flight - mw.connections.http_in_flight)

    # 4. The monitor and the registered background tasks.
    stopped = await budget.cancel_and_wait(
        [*mw._own_tasks(), *mw.tasks], "the monitor and registered tasks", budget.app_deadline
    )
    mw.tasks.clear()
    logger.info("asgi_dbpool: monitor and %d registered task(s) stopped", max(stopped - len(mw._own_tasks()), 0))

    # 5. The wrapped app's own shutdown (it may still use the database).
    answer = await inner.stop(budget.left(budget.app_deadline))
    if answer[0] == "timeout":
        logger.warning("asgi_dbpool: %s; it was cancelled", answer[1])

    # 6-7. Refuse checkouts from here on, reclaim what is still checked out, dispose every engine.
    await close_engines(mw, budget)
    logger.info("asgi_dbpool: shutdown finished in %.3fs", budget.elapsed())
    return answer


async def close_engines(mw: DBPoolMiddleware, budget: Budget) -> None:
    """Refuse checkouts, cancel the tasks still holding connections, close the leaks, dispose all engines.

    Checkouts are refused first: a task that is not holding a connection at the moment of the scan must not
    take one from the pool while it is being disposed (its query would be cut when the process exits).
    """
    mw.running = False
    me = asyncio.current_task()
    trackers = mw.all_trackers()
    for tracker in trackers:
        tracker.refuse_checkouts()
    owners = set().union(*(t.owners(me) for t in trackers))
    if owners:
        names = ", ".join(sorted(describe_task(t) for t in owners))
        logger.info("asgi_dbpool: cancelling %d task(s) still holding connections: %s", len(owners), names)
        # Half of what is left: the rest is for closing connections.
        halfway = budget.deadline - budget.left(budget.deadline) / 2
        await budget.cancel_and_wait(owners, "tasks holding connections", halfway)
    try:
        async with asyncio.timeout_at(budget.deadline):
            leaks = [report for tracker in trackers for report in await tracker.close_leaks()]
            results = await asyncio.gather(*(tracker.dispose() for tracker in trackers), return_exceptions=True)
    except TimeoutError:
        logger.warning(
            "asgi_dbpool: shutdown budget (shutdown_timeout=%.1fs) ran out closing connections; still open: %s",
            mw.shutdown_timeout,
            ", ".join(f"{t.name}={t.snapshot()['checked_in'] + len(t.checkouts)}" for t in trackers),
        )
        return
    for tracker, result in zip(trackers, results, strict=True):
        if isinstance(result, BaseException):
            logger.warning("asgi_dbpool: engine %r: dispose failed: %s", tracker.name, one_line(result))
    logger.info(
        "asgi_dbpool: %d engine(s) disposed; leaks: %s",
        len(trackers),
        f"{len(leaks)} closed (see warnings above)" if leaks else "none",
    )


async def force_close(mw: DBPoolMiddleware, inner: InnerLifespan | None) -> None:
    """The server cancelled the lifespan without ``lifespan.shutdown``: still close everything now."""
    budget = Budget(min(mw.shutdown_timeout, FORCE_EXIT_BUDGET))
    mw._enter_shutdown()
    logger.info("asgi_dbpool: lifespan cancelled without a shutdown message; closing connections now")
    await mw.connections.close_websockets(budget.drain_deadline)
    if inner is not None:
        inner.cancel()
    await budget.wait(mw.connections.wait_websockets(), "WebSocket handlers", budget.drain_deadline)
    await budget.cancel_and_wait([*mw._own_tasks(), *mw.tasks], "the monitor and registered tasks", budget.app_deadline)
    await close_engines(mw, budget)
