"""The database lifecycle of one wrapped app: its state, its tasks and every transition, in one object.

States: ``new`` -> ``starting`` -> ``running`` -> ``stopping`` -> ``stopped``; a failed or cancelled startup
goes straight to ``stopped`` after closing what it opened. Each transition leaves nothing running or open
(monitor, leak detection, registered tasks, the wrapped app's lifespan, every engine's connections) and
returns the one answer the middleware gives the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import weakref
from collections.abc import Collection, Sequence
from typing import Any, Generic, Literal, Protocol, TypeVar

from ..base.describe import one_line
from ..base.records import fields
from ..base.types import ASGIApp, Scope
from ..config.options import Options
from ..config.parse import mask_url
from ..config.settings import PGBOUNCER_MODES
from ..observe.advice import Topology
from ..observe.monitor import PoolMonitor, watch_leaks
from ..pool.tracker import PoolTracker
from . import log_filter as _logfilter
from . import shutdown_flag as _guard
from .inner_lifespan import InnerLifespan, Outcome
from .shutdown import (
    CLOSE_FRAME_TIMEOUT,
    CONNECTION_CLOSE_TIMEOUT,
    FORCE_EXIT_BUDGET,
    ShutdownClock,
    close_engines,
    give_back,
    take_over,
)
from .signals import DeferredTermination, noting_stop_signals, on_stop_signal
from .startup import APP_EXIT_TIMEOUT, StartupError, check_budget, check_reachable, pool_logger_names

logger = logging.getLogger("asgi_dbpool")

State = Literal["new", "starting", "running", "stopping", "stopped"]


class Connections(Protocol):
    """The HTTP requests in flight and the open WebSockets, as the lifecycle drains and closes them: the ASGI
    layer's :class:`~asgi_dbpool.asgi.connections.ConnectionTracker`, which the middleware gives its lifecycle."""

    http_in_flight: int
    closed_by_server: int
    watched: bool

    @property
    def websockets(self) -> Collection[Any]: ...

    def http_done(self) -> None: ...

    async def wait_http(self) -> None: ...

    async def wait_websockets(self) -> None: ...

    async def close_websockets(self, deadline: float, code: int = ...) -> tuple[int, int]: ...


ConnectionsT = TypeVar("ConnectionsT", bound=Connections)


class Lifecycle(Generic[ConnectionsT]):
    """Owns one app's database lifecycle; the middleware speaks ASGI and calls :meth:`start`, :meth:`shutdown`
    and :meth:`abort`, each of which returns (or raises) exactly once and leaves nothing behind."""

    def __init__(
        self,
        app: ASGIApp,
        options: Options,
        trackers: Sequence[PoolTracker],
        sync_trackers: Sequence[PoolTracker],
        topology: Topology,
        connections: ConnectionsT,
    ) -> None:
        self.app = app
        self.options = options
        self.trackers = list(trackers)
        self.all_trackers = [*trackers, *sync_trackers]
        self.topology = topology
        self.connections = connections
        self.monitor = PoolMonitor(self.trackers, options.monitor_interval, stopped=lambda: self.shutting_down)
        self.state: State = "new"
        self.shutting_down = False  # set with the state, from the shutdown's first step on
        # Read per request (a plain attribute, set with the state): a lifespan is starting or running. Otherwise a
        # request is served without one (see :meth:`enter_unhosted`), or refused while shutting down.
        self.serving = False
        self.warned_unhosted = False
        self.unhosted_in_flight = 0  # requests and WebSockets served without a lifespan, now
        self.unhosted_closing: asyncio.Future[None] | None = None
        # The server began to stop: its shutdown trigger fired (see DBPoolMiddleware.shutdown_trigger), or a stop
        # signal came while running.
        self.server_stopping = False
        self.signal_watch = contextlib.ExitStack()
        self.tasks: set[asyncio.Task[Any]] = set()  # registered by the app: cancelled before its own shutdown
        self.monitor_task: asyncio.Task[None] | None = None
        self.leak_task: asyncio.Task[None] | None = None
        self.inner: InnerLifespan | None = None
        self.termination = DeferredTermination()  # SIGTERM where nothing handles it: held until we closed ours
        self.terminating: asyncio.Task[tuple[Outcome, str]] | None = None  # the shutdown that such a SIGTERM began
        self.claim(strict=False)

    @property
    def active(self) -> bool:
        """Starting, running or stopping: it owns its engines now."""
        return self.state in ("starting", "running", "stopping")

    # -- engines and options ------------------------------------------------------------------
    def claim(self, *, strict: bool) -> None:
        """Make this lifecycle the owner of its engines' trackers, so its pool options apply.

        One engine has one owner at a time: a second middleware *running* on it would apply its own options and
        dispose the engine under the first at its shutdown. ``strict`` (at startup) refuses that; at construction
        a running owner keeps its options until this one starts.
        """
        for tracker in self.all_trackers:
            owner = tracker.owner() if tracker.owner is not None else None
            if owner is not None and owner is not self and owner.active:
                if not strict:
                    return
                raise StartupError(
                    f"asgi_dbpool: engine {tracker.name!r} at {mask_url(tracker.engine.url)} is already managed by "
                    "another running DBPoolMiddleware; wrap the app once (one middleware per engine) or give each "
                    "app its own engine"
                )
        for tracker in self.all_trackers:
            tracker.owner = weakref.ref(self)
            tracker.leak_threshold = self.options.leak_threshold
            tracker.acquisition.max_pending = self.options.max_pending

    def pgbouncer_mode(self, tracker: PoolTracker) -> str:
        """``off``, ``session`` or ``transaction``: the option, else what ``PoolSettings`` recorded for the engine;
        ``unknown`` when neither says but startup saw a connection pooler in front."""
        said = self.options.pgbouncer or PGBOUNCER_MODES.get(tracker.engine)
        if said is not None:
            return said
        return "unknown" if tracker.server.get("pooler") else "off"

    def register(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- transitions --------------------------------------------------------------------------
    async def start(self, scope: Scope) -> tuple[str, BaseException | None] | None:
        """Our startup, then the wrapped app's; ``None`` when both completed, else the one line for
        ``lifespan.startup.failed`` and the exception to raise after it (everything opened is closed again
        before it returns): ours (:class:`StartupError`, whose message is that line), or what the wrapped app
        raised; ``None`` when the app failed its startup without raising.

        SIGINT or SIGTERM during it ends it too, everything closed, and returns ``None``: the server was asked to
        stop, so ``startup.complete`` lets it go on to that shutdown (``startup.failed`` would read as a broken
        app: uvicorn exits 3, which gunicorn's master takes for a worker that failed to boot and halts on, cutting
        the other workers); the shutdown then finds nothing left to close.
        A cancellation (the server stopping during startup) propagates; the caller then calls :meth:`abort`.
        """
        try:
            self.claim(strict=True)
        except StartupError as exc:  # the engines are another running app's: nothing here to close
            return str(exc), exc
        self.state = "starting"
        self.serving = True
        self.unhosted_in_flight = 0  # any still in flight are the lifespan's from now on
        self.connections.watched = False
        self.shutting_down = self.server_stopping = False
        self.terminating = None
        _guard.app_started(self)
        task = asyncio.current_task()
        stopped_by: list[signal.Signals] = []

        def stop(sig: signal.Signals) -> None:  # SIGTERM/SIGINT while starting: end the startup now
            if not stopped_by and self.state == "starting" and task is not None:
                stopped_by.append(sig)
                task.cancel()

        self.termination.install(self._terminated)  # before on_stop_signal, which then chains in front of it
        error: BaseException | None
        try:
            with on_stop_signal(stop):
                await self._start_ours()
                self.inner = InnerLifespan(self.app, scope)
                outcome, detail = await self.inner.start()
        except asyncio.CancelledError:
            if not stopped_by or task is None or task.uncancel():  # the server's own cancellation: honour it
                raise
            # Logged first: with SIGTERM held by DeferredTermination the process ends as the closing completes.
            logger.info("startup stopped by %s before it completed; closing what it opened", stopped_by[0].name)
            await self._close_quietly()
            return None
        except StartupError as exc:
            failure, error = str(exc), exc
        except Exception as exc:  # any other failure answers startup.failed too, never silence
            logger.error("startup failed", exc_info=exc)
            failure = f"asgi_dbpool: startup failed: {one_line(exc)}"
            error = StartupError(failure)  # the traceback is in our log; the caller gets the line
        else:
            if outcome != "failed":
                self.state = "running"
                # From now on a stop signal tells a request cancelled by the server (its graceful timeout ran
                # out) from any other cancellation, which is the caller's (see DBPoolMiddleware.__call__).
                self.signal_watch.enter_context(noting_stop_signals(self._signalled))
                return None
            # Starlette sends startup.failed, then raises: what it raises is what a test client must see.
            failure, error = detail, await self.inner.exited(APP_EXIT_TIMEOUT)
        await self._close_quietly()
        return failure, error

    async def shutdown(self) -> tuple[Outcome, str]:
        """The ordered shutdown, every step bounded by ``shutdown_timeout``; returns the wrapped app's answer."""
        terminating = self.terminating
        if terminating is not None and terminating is not asyncio.current_task():  # a SIGTERM began it: wait
            return await asyncio.shield(terminating)
        if self.state == "stopped":  # a startup stopped by a signal closed everything already
            return ("not running", "")
        clock = ShutdownClock(self.options.shutdown_timeout)
        self._enter_shutdown()  # 1. the flag first
        logger.info("shutdown flag set (budget %.1fs)", clock.seconds, extra=fields("flag", budget=clock.seconds))
        await self._close_websockets(clock)  # 2.
        await self._drain_requests(clock)  # 3.
        stopped = await clock.cancel_and_wait(  # 4.
            [*self._own_tasks(), *self.tasks], "the monitor and registered tasks", clock.app_deadline
        )
        registered = max(stopped - len(self._own_tasks()), 0)
        logger.info("monitor and %d registered task(s) stopped", registered, extra=fields("tasks", stopped=registered))
        answer: tuple[Outcome, str] = ("not running", "")
        try:
            if self.inner is not None:  # 5. the wrapped app's own shutdown (it may still use the database)
                answer = await self.inner.stop(clock.left(clock.app_deadline))
                if answer[0] == "timeout":
                    logger.warning("%s; it was cancelled", answer[1])
            await close_engines(self.all_trackers, clock)  # 6-7. refuse checkouts, reclaim, dispose
        finally:
            self._end_deferral()
        logger.info("shutdown finished in %.3fs", clock.elapsed(), extra=fields("finished", seconds=clock.elapsed()))
        self._stopped()
        return answer

    async def close_after_cancel(self, forced_exit: bool = False) -> None:
        """The lifespan task was cancelled: :meth:`abort` in a task of its own, waited for to the end
        (``forced_exit``: the cancellation is the server's, see :meth:`abort`).

        A cancel scope (anyio's, which test clients use) cancels its task again at every ``await``: closing in
        this task would be cut at its first one. The wait is bounded by the abort's own budget.
        """
        closing = asyncio.ensure_future(self.abort(forced_exit))
        while not closing.done():
            try:
                await asyncio.shield(closing)
            except asyncio.CancelledError:
                continue
        closing.result()

    async def abort(self, forced_exit: bool = False) -> None:
        """The server cancelled the lifespan (a forced exit, or a stop during startup): close everything now,
        within ``min(shutdown_timeout, FORCE_EXIT_BUDGET)``.

        ``forced_exit``: the cancellation is the server's own (uvicorn's second Ctrl+C: ``asyncio.run`` cancels every
        task at once), so a connection whose holder was cancelled was cut off there, not leaked by the app.
        """
        if self.state == "stopped":  # a startup stopped by a signal closed everything already
            return
        if self.terminating is not None:  # a SIGTERM's shutdown is under way: it closes everything
            await asyncio.shield(self.terminating)
            return
        clock = ShutdownClock(min(self.options.shutdown_timeout, FORCE_EXIT_BUDGET))
        self._enter_shutdown()
        logger.info("lifespan cancelled without a shutdown message; closing connections now")
        await self.connections.close_websockets(clock.drain_deadline)
        await clock.wait(self.connections.wait_websockets(), "WebSocket handlers", clock.drain_deadline)
        await self._stop_everything(clock, logging.INFO, forced_exit)

    async def server_stops(self, code: int) -> None:
        """The server began to stop (its shutdown trigger fired): close open WebSockets with ``code``; refuse more."""
        self._server_began_stopping()
        deadline = asyncio.get_running_loop().time() + CLOSE_FRAME_TIMEOUT
        closed, pending = await self.connections.close_websockets(deadline, code)
        logger.info(
            "the server is stopping: %d WebSocket(s) closed with %d%s",
            closed,
            code,
            f" ({pending} close frame(s) not taken in time)" if pending else "",
        )

    # -- requests without a lifespan ------------------------------------------------------------
    async def enter_unhosted(self) -> None:
        """A request or WebSocket arrives while no lifespan runs (a test client without ``with``, an ASGI
        transport, ``--lifespan off``, a framework that keeps the middleware off the lifespan path): it is served
        as the bare app would serve it, and when the last such one ends every connection they opened is closed
        on their own event loop (see :meth:`leave_unhosted`), which may end right after."""
        if not self.warned_unhosted:
            self.warned_unhosted = True
            logger.warning(
                "DBPoolMiddleware is serving a request but no lifespan is running (a test client used without "
                "'with', a server run with --lifespan off, Litestar's per-route middleware=[...]): no startup "
                "check ran and the connections of such requests are closed when they end, so none outlives its "
                "event loop; for normal pooling run the lifespan ('with TestClient(app)', "
                "'async with LifespanManager(app)'), wrap the whole app, or on Litestar use "
                "asgi_dbpool.litestar.DBPoolPlugin",
                extra=fields("no_lifespan"),
            )
        closing = self.unhosted_closing
        if closing is not None and not closing.done() and closing.get_loop() is asyncio.get_running_loop():
            await asyncio.shield(closing)  # the previous ones' connections are being closed: not from that pool
        if not self.unhosted_in_flight:
            for tracker in self.all_trackers:
                tracker.reopen()  # refused since the last shutdown, or never opened
        self.unhosted_in_flight += 1
        self.connections.watched = True

    async def leave_unhosted(self) -> None:
        """One request or WebSocket served without a lifespan ended; after the last one, close the connections."""
        self.unhosted_in_flight -= 1
        if self.unhosted_in_flight or self.serving:
            return
        self.connections.watched = self.state == "stopping"
        self.unhosted_closing = closing = asyncio.ensure_future(self._close_unhosted())
        await asyncio.shield(closing)

    async def request_ended(self) -> None:
        """An HTTP request ended while someone watches: the shutdown's drain, or requests without a lifespan."""
        self.connections.http_done()
        if self.unhosted_in_flight and not self.serving:
            await self.leave_unhosted()

    async def _close_unhosted(self) -> None:
        for tracker in self.trackers:
            # Connections the finished requests still hold were leaked: the WARNING names them, as at shutdown.
            await tracker.close_leaks(only=lambda checkout: checkout.request is not None and checkout.request.done)
            if not tracker.held and tracker.async_engine is not None:
                # Something else (a test's own session) holds one: the pool stays, and the next such request
                # closes its idle connections.
                await tracker.async_engine.dispose(close=True)

    # -- steps ---------------------------------------------------------------------------------
    async def _start_ours(self) -> None:
        for tracker in self.all_trackers:
            tracker.reopen()
        await check_reachable(self.all_trackers, self.options.startup_timeout)
        await check_budget(self.trackers, self.topology, self.pgbouncer_mode)
        if self.options.install_log_filter:
            _logfilter.install(pool_logger_names(self.all_trackers))
        self.monitor_task = asyncio.create_task(self.monitor.run(), name="asgi_dbpool: pool monitor")
        if self.options.leak_threshold is not None:
            self.leak_task = asyncio.create_task(
                watch_leaks(self.all_trackers, self.options.leak_threshold), name="asgi_dbpool: leak detection"
            )
        engines = len(self.all_trackers)
        logger.info("%d engine(s) reachable; pool monitor started", engines, extra=fields("started", engines=engines))
        options = self.options
        if options.production and options.stats_path is not None and options.stats_token is None:
            logger.warning(
                "the pool endpoints at %s (figures, metrics, advice) answer anyone: set DB_POOL_STATS_TOKEN "
                "(stats_token=) to require a bearer token, or DB_POOL_STATS_PATH=off (stats_path=None)",
                options.stats_path,
                extra=fields("public_endpoints", path=options.stats_path),
            )

    async def _close_websockets(self, clock: ShutdownClock) -> None:
        """Close (idempotently) and wait for their handlers, which usually hold sessions."""
        connections = self.connections
        open_sockets = len(connections.websockets)
        closed, pending = await connections.close_websockets(clock.drain_deadline)
        if pending:
            logger.warning(
                "the server did not take the close frame of %d WebSocket(s) within %.1fs; their "
                "handlers were interrupted anyway",
                pending,
                CLOSE_FRAME_TIMEOUT,
            )
        await clock.wait(
            connections.wait_websockets(),
            "WebSocket handlers",
            clock.drain_deadline,
            lambda: f"{len(connections.websockets)} handler(s)",
        )
        logger.info(
            "%d WebSocket(s) closed (%d were open, %d already closed by the server; %d closed by the "
            "server before the shutdown)",
            closed,
            open_sockets,
            open_sockets - closed - pending,
            connections.closed_by_server,
            extra=fields(
                "websockets",
                closed=closed,
                open=open_sockets,
                already_closed=open_sockets - closed - pending,
                closed_by_server_before=connections.closed_by_server,
            ),
        )

    async def _drain_requests(self, clock: ShutdownClock) -> None:
        connections = self.connections
        in_flight = connections.http_in_flight
        drained = asyncio.ensure_future(connections.wait_http())
        await asyncio.wait([drained], timeout=min(CONNECTION_CLOSE_TIMEOUT, clock.left(clock.drain_deadline)))
        if not drained.done():  # requests the server cancelled may be waiting on a database that stopped answering
            for tracker in self.all_trackers:
                tracker.abort_closing()
        await clock.wait(
            drained,
            "in-flight HTTP requests",
            clock.drain_deadline,
            lambda: f"{connections.http_in_flight} request(s)",
        )
        drained_count = in_flight - connections.http_in_flight
        logger.info("%d in-flight request(s) drained", drained_count, extra=fields("drain", drained=drained_count))

    async def _close_quietly(self) -> None:
        """After a failed startup: stop what it started and close the engines (progress at DEBUG only: the
        server reports the failure in one line)."""
        clock = ShutdownClock(min(self.options.shutdown_timeout, FORCE_EXIT_BUDGET))
        self._enter_shutdown()
        await self._stop_everything(clock, logging.DEBUG)

    async def _stop_everything(self, clock: ShutdownClock, level: int, forced_exit: bool = False) -> None:
        """The forced paths' end: the app's lifespan, the monitor and registered tasks, every engine."""
        if self.inner is not None and self.inner.task is not None:
            await clock.cancel_and_wait([self.inner.task], "the wrapped app's lifespan", clock.drain_deadline)
        await clock.cancel_and_wait(
            [*self._own_tasks(), *self.tasks], "the monitor and registered tasks", clock.app_deadline
        )
        try:
            await close_engines(self.all_trackers, clock, level, forced_exit)
        finally:
            self._end_deferral()
        self._stopped()

    def _own_tasks(self) -> list[asyncio.Task[Any]]:
        return [task for task in (self.monitor_task, self.leak_task) if task is not None]

    def _enter_shutdown(self) -> None:
        self.state = "stopping"
        self.serving = False
        self.shutting_down = True
        take_over(self.all_trackers)  # cancelled holders' connections: see _server_began_stopping
        for tracker in self.all_trackers:  # the app's own engine.dispose() waits for our last step
            tracker.defer_disposal()
        _guard.app_stopping(self)

    def _end_deferral(self) -> None:
        """``engine.dispose()`` disposes again (our last step did, or the shutdown failed before it)."""
        for tracker in self.all_trackers:
            tracker.end_deferral()

    def _signalled(self) -> None:
        self._server_began_stopping()

    def _server_began_stopping(self) -> None:
        """A stop signal came while running, or the server's shutdown trigger fired: requests that arrive from now
        on are refused (503 + Connection: close; see DBPoolMiddleware.__call__), those in flight go on."""
        self.server_stopping = True
        if self.state == "running":
            self.serving = False
            # A forced exit may follow, cancelling every task at once: their connections get a goodbye of their own.
            take_over(self.all_trackers)

    def _stopped(self) -> None:
        self.state = "stopped"
        give_back(self.all_trackers)
        self.signal_watch.close()
        _guard.app_stopped(self)

    async def _shutdown_on_sigterm(self) -> tuple[Outcome, str]:
        """The shutdown a held SIGTERM began (no server asked for it): the process ends once it is done."""
        try:
            return await self.shutdown()
        finally:
            self.release_termination()

    def release_termination(self) -> None:
        """The server has this app's last answer (or none is owed): a SIGTERM held meanwhile ends the process now,
        as its default would have, once no other app of the process holds it."""
        self.termination.release()

    def _terminated(self) -> None:
        """SIGTERM arrived where nothing else handles it (see :class:`DeferredTermination`). Starting: the handler
        ``start`` chains in front of it ends the startup. Running: the whole shutdown runs now, as if the server
        had asked; stopping: the shutdown under way goes on. Either way the process ends when it is done."""
        if self.state == "running":
            self.terminating = asyncio.get_running_loop().create_task(
                self._shutdown_on_sigterm(), name="asgi_dbpool: shutdown on SIGTERM"
            )
        elif self.state in ("new", "stopped"):
            self.termination.release()
