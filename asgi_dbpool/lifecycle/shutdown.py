"""The shutdown's clock (one ``shutdown_timeout`` split into phase deadlines) and its last step: closing the
engines' connections while the loop still runs."""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from sqlalchemy.util import await_only, greenlet_spawn

from ..base.describe import describe_task, one_line
from ..base.records import fields
from ..pool.dialects import abort, wait_closed
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
#: What a connection taken over from a cancelled holder is left of the budget's end: its close must be over (or
#: aborted) before the budget's last wait runs out.
TAKEN_OVER_MARGIN = 0.05


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


class _TakenOver:
    """One engine's closes and commits taken over from SQLAlchemy while its app stops (see :func:`take_over`)."""

    def __init__(self, terminate: Callable[[Any], None], commit: Callable[[Any], None]) -> None:
        self.terminate, self.commit = terminate, commit  # the dialect's own, put back by give_back
        self.closing: dict[asyncio.Task[bool], Any] = {}  # each close and its driver connection
        self.committing: dict[asyncio.Task[None], asyncio.Task[Any] | None] = {}  # each COMMIT and its holder
        self.deadline: float | None = None  # loop time by which every close is over: the budget's end, once known


_TAKEN_OVER: weakref.WeakKeyDictionary[Any, _TakenOver] = weakref.WeakKeyDictionary()  # by dialect


class _Committing(asyncio.Task[None]):
    """A COMMIT sent while the app stops: nothing cancels it (a forced exit's ``asyncio.run`` cancels every task of
    the loop at once, an anyio cancel scope its own at every ``await``). It ends with its answer, with the driver's
    own query timeout, or when the shutdown closes its connection at the budget's end (see :func:`close_engines`)."""

    def cancel(self, msg: Any = None) -> bool:
        return False


def take_over(trackers: Iterable[PoolTracker]) -> None:
    """From now on (the server began to stop, or the shutdown did), on the async engines of ``trackers``: close in a
    task of our own each connection SQLAlchemy invalidates, and let every COMMIT finish whatever happens to the task
    that sent it.

    A holder cancelled in the middle of a query (a forced exit, a graceful timeout that ran out) has its connection
    invalidated by SQLAlchemy, which closes it in the holder's task: gracefully for up to 2 s (asyncpg cancels the
    running statement, then says Terminate), unless the holder is cancelled again meanwhile, as an anyio cancel scope
    does at every ``await`` (Starlette's ``BaseHTTPMiddleware`` runs the app in one): the socket is then aborted and
    PostgreSQL logs ``Connection reset by peer`` and ``unexpected EOF on client connection with an open transaction``.
    Taken over, the close is not in the holder's task: the running statement is cancelled and Terminate is said,
    within the shutdown's budget, whatever happens to the holder.

    A holder cancelled during its COMMIT would have the driver cancel the COMMIT (asyncpg sends PostgreSQL a cancel
    request, which aborts it while deferred constraints or triggers run): a COMMIT the client may already have been
    told about (FastAPI runs a ``yield`` dependency's commit after the response). Taken over, the COMMIT runs in a
    task nothing cancels; the holder waits for it, then gets its cancellation; the shutdown closes the connection
    only once it is over or the budget has run out.
    """
    for tracker in trackers:
        if tracker.async_engine is None:
            continue
        dialect = tracker.engine.dialect
        if dialect in _TAKEN_OVER:
            continue
        taken = _TakenOver(dialect.do_terminate, dialect.do_commit)
        _TAKEN_OVER[dialect] = taken
        dialect.do_terminate = functools.partial(_terminate, dialect, taken)  # type: ignore[method-assign]
        dialect.do_commit = functools.partial(_commit, taken)  # type: ignore[method-assign]


def give_back(trackers: Iterable[PoolTracker]) -> None:
    """SQLAlchemy closes invalidated connections and commits as usual again (the app stopped)."""
    for tracker in trackers:
        dialect = tracker.engine.dialect
        if _TAKEN_OVER.pop(dialect, None) is not None:
            for name in ("do_terminate", "do_commit"):
                if isinstance(vars(dialect).get(name), functools.partial):
                    delattr(dialect, name)


def _terminate(dialect: Any, taken: _TakenOver, dbapi_connection: Any) -> None:
    """The dialect's ``do_terminate`` while its app stops: the close goes on in a task of its own."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop in this thread: SQLAlchemy's own way
        taken.terminate(dbapi_connection)
        return
    driver = dialect.get_driver_connection(dbapi_connection)
    if driver is None:
        taken.terminate(dbapi_connection)
        return
    # As every other connection at shutdown: gracefully for CONNECTION_CLOSE_TIMEOUT at most, within the budget. (A
    # COMMIT is over by now: its holder waited for it, see _commit.)
    deadline = taken.deadline
    seconds = CONNECTION_CLOSE_TIMEOUT if deadline is None else min(CONNECTION_CLOSE_TIMEOUT, deadline - loop.time())
    seconds = max(seconds, 0.0)
    task = loop.create_task(wait_closed(driver, seconds), name="asgi_dbpool: closing a cancelled holder's connection")
    taken.closing[task] = driver
    task.add_done_callback(lambda done: taken.closing.pop(done, None))


def _commit(taken: _TakenOver, dbapi_connection: Any) -> None:
    """The dialect's ``do_commit`` while its app stops (in the holder's greenlet): the COMMIT in a task nothing cancels,
    waited for to the end; a cancellation of the holder meanwhile is raised once it is over."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # pragma: no cover - an async engine commits in the loop
        taken.commit(dbapi_connection)
        return
    holder = asyncio.current_task()
    commit = _Committing(greenlet_spawn(taken.commit, dbapi_connection), loop=loop, name="asgi_dbpool: a COMMIT")
    taken.committing[commit] = holder
    commit.add_done_callback(lambda done: taken.committing.pop(done, None))
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            await_only(asyncio.shield(commit))
            break
        except asyncio.CancelledError as exc:  # the holder's (the COMMIT itself is never cancelled)
            cancelled = exc
        except BaseException:  # the COMMIT failed: its error, unless the holder was cancelled meanwhile
            if cancelled is None:
                raise
            break
    if cancelled is not None:
        raise cancelled  # the COMMIT is over: the holder's cancellation goes on


def _note_deadline(trackers: Iterable[PoolTracker], deadline: float) -> None:
    for tracker in trackers:
        taken = _TAKEN_OVER.get(tracker.engine.dialect)
        if taken is not None:
            taken.deadline = deadline


async def _taken_over_closed(trackers: Sequence[PoolTracker], deadline: float) -> list[int]:
    """Wait (until ``deadline``) for the closes taken over; abort what is left; per tracker, how many were aborted
    (by their own timeout, or here)."""
    counts = []
    for tracker in trackers:
        taken = _TAKEN_OVER.get(tracker.engine.dialect)
        closing = dict(taken.closing) if taken is not None else {}
        aborted = 0
        if closing:
            timeout = max(deadline - asyncio.get_running_loop().time(), 0.0)
            done, pending = await asyncio.wait(closing, timeout=timeout)
            aborted = sum(not task.cancelled() and task.exception() is None and not task.result() for task in done)
            for task in pending:
                abort(closing[task])
                aborted += 1
        counts.append(aborted)
    return counts


async def close_engines(
    trackers: Sequence[PoolTracker], clock: ShutdownClock, level: int = logging.INFO, forced_exit: bool = False
) -> None:
    """Refuse checkouts, cancel the tasks still holding connections, close every connection, dispose all engines.

    Checkouts are refused first: a task that is not holding a connection at the moment of the scan must not
    take one from the pool while it is being disposed (its query would be cut when the process exits).
    Every connection is then closed at once, each gracefully for at most :data:`CONNECTION_CLOSE_TIMEOUT`: a
    database that stopped answering costs that, not the budget, and one WARNING says so.
    ``level`` is that of the progress lines (DEBUG after a failed startup, which the server reports in one line).
    ``forced_exit``: the server cancelled every task at once (see :meth:`PoolTracker.close_leaks`).
    """
    me = asyncio.current_task()
    take_over(trackers)  # (where the server's stop did not already)
    _note_deadline(trackers, clock.deadline - TAKEN_OVER_MARGIN)
    for tracker in trackers:
        tracker.refuse_checkouts()
    owners = set().union(*(t.owners(me) for t in trackers))
    commits = _commits(trackers)  # a COMMIT in flight is not cut before the budget's end: see take_over
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
        committing = {holder for holder in commits.values() if holder in owners}
        for holder in committing:  # its cancellation is raised once its COMMIT is over
            if not holder.cancelling():
                holder.cancel()
        stopping = asyncio.ensure_future(clock.cancel_and_wait(owners - committing, "tasks holding connections", until))
        await asyncio.wait([stopping], timeout=CONNECTION_CLOSE_TIMEOUT)
        if not stopping.done():  # a cancelled query's connection may be closing on a database that does not answer
            for tracker in trackers:
                tracker.abort_closing()
        await stopping
    commits = _commits(trackers)  # (those the cancelled holders were in, and any they began meanwhile)
    if commits:
        await _commits_over(commits, clock)
    if owners:
        await _settle(trackers, owners, clock)
    for close in _sqlalchemy_closes():  # before their connections are closed under them
        close.add_done_callback(_take_error)
    try:
        async with asyncio.timeout_at(clock.deadline):
            seconds = min(CONNECTION_CLOSE_TIMEOUT, clock.left(clock.deadline))
            pooled, taken_over = await asyncio.gather(
                asyncio.gather(*(tracker.close_connections(seconds) for tracker in trackers)),
                _taken_over_closed(trackers, clock.deadline - TAKEN_OVER_MARGIN),
            )
            aborted = [a + b for a, b in zip(pooled, taken_over, strict=True)]
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
            closed = [await tracker.close_leaks(forced_exit=forced_exit) for tracker in trackers]
            leaks = [report for reports, _ in closed for report in reports]
            cut = [report for _, reports in closed for report in reports]
            results = await asyncio.gather(*(tracker.dispose() for tracker in trackers), return_exceptions=True)
            await _taken_over_closed(trackers, clock.deadline - TAKEN_OVER_MARGIN)  # (reclaimed leaks: closed already)
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
    # (cut_off only where there is one: a forced exit's count, beside the same figures as any other shutdown's)
    figures = {"engines": len(trackers), "leaks": len(leaks), **({"cut_off": len(cut)} if cut else {})}
    logger.log(
        level,
        "%d engine(s) disposed; leaks: %s%s",
        len(trackers),
        f"{len(leaks)} closed (see warnings above)" if leaks else "none",
        f"; cut off by the forced exit: {len(cut)} closed" if cut else "",
        extra=fields("dispose", None, **figures),
    )


def _commits(trackers: Sequence[PoolTracker]) -> dict[asyncio.Task[None], asyncio.Task[Any] | None]:
    """The COMMITs in flight on these engines (taken over: see :func:`take_over`), each with the task that sent it."""
    found: dict[asyncio.Task[None], asyncio.Task[Any] | None] = {}
    for tracker in trackers:
        taken = _TAKEN_OVER.get(tracker.engine.dialect)
        if taken is not None:
            found.update((commit, holder) for commit, holder in taken.committing.items() if not commit.done())
    return found


async def _commits_over(commits: dict[asyncio.Task[None], asyncio.Task[Any] | None], clock: ShutdownClock) -> None:
    """Give the COMMITs in flight the budget but what closing the connections takes; one WARNING for those left."""
    until = clock.deadline - min(CONNECTION_CLOSE_TIMEOUT, clock.seconds / 4)
    _, pending = await asyncio.wait(commits, timeout=max(until - asyncio.get_running_loop().time(), 0.0))
    if pending:
        logger.warning(
            "%d COMMIT(s) still running when the shutdown budget (shutdown_timeout=%.1fs) ran out; their connections "
            "are closed now, which cancels them",
            len(pending),
            clock.seconds,
            extra=fields("overrun", waiting_for="commits", still_running=len(pending), budget=clock.seconds),
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


def _sqlalchemy_closes() -> list[asyncio.Task[Any]]:
    """The tasks in which SQLAlchemy's asyncio layer is closing a session or a connection.

    SQLAlchemy closes an ``async with`` session or connection in a task of its own. Before 2.1 it waits for that
    task behind ``asyncio.shield``: a holder cancelled meanwhile stops waiting, and nothing awaits the close any
    more. Its connection closed by the shutdown, the close fails, and asyncio logs "Task exception was never
    retrieved". (2.1 waits for the close whatever happens: the holder gets the error, and :func:`_reap` takes it.)
    Told by the module of the coroutine's code, a detail of SQLAlchemy's: tests/test_blackhole.py runs the lowest
    and newest SQLAlchemy.
    """
    found = []
    for task in asyncio.all_tasks():
        frame = getattr(task.get_coro(), "cr_frame", None)
        if frame is not None and str(frame.f_globals.get("__name__")).startswith("sqlalchemy.ext.asyncio."):
            found.append(task)
    return found


def _take_error(task: asyncio.Task[Any]) -> None:
    """A close of SQLAlchemy's that failed because the shutdown closed its connection: expected, so said at DEBUG."""
    if not task.cancelled() and (error := task.exception()) is not None:
        logger.debug("a close of SQLAlchemy's ended with its connection closed by the shutdown: %s", one_line(error))


async def _reap(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Let cancelled holders whose connection was just closed under them finish, and take their errors: they were
    asked to stop, and an error nobody retrieves is logged as "Task exception was never retrieved"."""
    pending = [t for t in tasks if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=REAP_TIMEOUT)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()
