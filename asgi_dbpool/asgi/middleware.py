"""``DBPoolMiddleware``: the pure-ASGI wrapper that owns the database lifecycle of an app."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from ..base.types import STATE_KEY, ASGIApp, Receive, Scope, Send
from ..config.drivers import check_engine, check_sync_engine
from ..config.options import DEFAULT_STATS_PATH, Options
from ..lifecycle.lifecycle import Lifecycle
from ..lifecycle.startup import StartupError
from ..observe import otel as _otel
from ..observe.advice import Topology, workers_from_env
from ..observe.monitor import PoolMonitor
from ..pool.checkout import current_task
from ..pool.registry import name_engines, tracker_for
from ..pool.tracker import PoolTracker
from .connections import SERVICE_RESTART, ConnectionTracker, answer_cancelled, cancelled_by_server
from .late_commits import LateCommits, on_session_commit
from .request import InFlight, reset_request, set_request
from .responses import POOL_EXHAUSTED, SHUTTING_DOWN, respond
from .stats_app import PoolStatsApp, route_path

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

logger = logging.getLogger("asgi_dbpool")
_CURRENT: ContextVar[DBPoolMiddleware | None] = ContextVar("asgi_dbpool_middleware", default=None)

__all__ = ["DEFAULT_STATS_PATH", "DBPoolMiddleware"]


def is_asgi3(app: Any) -> bool:
    """Whether ``app`` speaks ASGI 3 (``await app(scope, receive, send)``), judged as uvicorn's and Starlette's
    ``TestClient``'s ``interface="auto"`` judge it: a class is ASGI 3 when its instances are awaitable, anything
    else when it (or its ``__call__``) is a coroutine function."""
    if inspect.isclass(app):
        return hasattr(app, "__await__")
    while isinstance(app, functools.partial):
        app = app.func
    return inspect.iscoroutinefunction(app) or (callable(app) and inspect.iscoroutinefunction(app.__call__))


class ASGI2App:
    """An ASGI 2 app (``app(scope)`` returns an ``await instance(receive, send)``) seen as an ASGI 3 one."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        instance = self.app(scope)
        await instance(receive, send)


def _prints_raised(send: Send) -> bool:
    """Whether the server prints the traceback of an exception raised after ``lifespan.startup.failed``: granian
    does (its ``LifespanProtocol`` logs it), after it printed the message already. Our own failure then ends
    there, in its one line; an exception of the wrapped app is raised as the bare app raises it. (Judged by the
    module of the bound ``send``: granian has no public marker; tests/test_server_output.py runs the lowest and
    newest granian.)"""
    owner = getattr(send, "__self__", None)
    return type(owner).__module__.startswith("granian")


class DBPoolMiddleware:
    """Wrap an ASGI app so its database engines start checked, stay observable and close in order.

    ``engine`` is an :class:`AsyncEngine` or a mapping of names to engines (the first is the default).
    See the README for the shutdown sequence; every wait in it is bounded by ``shutdown_timeout``. A bad
    option raises :class:`ConfigError` (a ``ValueError``) naming it, with the same rules as ``PoolSettings``.
    """

    def __init__(
        self,
        app: ASGIApp,
        engine: AsyncEngine | Mapping[str, AsyncEngine],
        *,
        sync_engines: Iterable[Engine] = (),
        stats_path: str | None = DEFAULT_STATS_PATH,
        stats_token: str | None = None,
        monitor_interval: float = 60.0,
        shutdown_timeout: float = 10.0,
        startup_timeout: float = 10.0,
        install_log_filter: bool = True,
        leak_threshold: float | None = None,
        workers: int | None = None,
        hosts: int = 1,
        pgbouncer: str | None = None,
        pgbouncer_pool_size: int | None = None,
        retry_after: int = 1,
        max_pending: int | None = None,
        production: bool = False,
    ) -> None:
        self.app = app if is_asgi3(app) else ASGI2App(app)
        self.options = options = Options(
            stats_path=stats_path,
            stats_token=stats_token,
            monitor_interval=monitor_interval,
            shutdown_timeout=shutdown_timeout,
            startup_timeout=startup_timeout,
            install_log_filter=install_log_filter,
            leak_threshold=leak_threshold,
            workers=workers,
            hosts=hosts,
            pgbouncer=pgbouncer,
            pgbouncer_pool_size=pgbouncer_pool_size,
            retry_after=retry_after,
            max_pending=max_pending,
            production=production,
        )
        named = name_engines(engine)
        for name, value in named.items():
            if not isinstance(value, AsyncEngine):
                raise TypeError(f"engine {name!r} must be an AsyncEngine, got {value!r}.")
            check_engine(value, name)  # a driver asgi_dbpool does not handle: ConfigError, as PoolSettings says
        self.engines: dict[str, AsyncEngine] = named
        sync_engines = [check_sync_engine(eng, i) for i, eng in enumerate(sync_engines)]
        trackers = [tracker_for(eng, name) for name, eng in named.items()]
        sync_trackers = [tracker_for(eng, f"sync:{i}") for i, eng in enumerate(sync_engines)]
        # The budget check's multipliers; WEB_CONCURRENCY is read now, so a malformed value fails at construction.
        topology = Topology(options.workers or workers_from_env(), options.hosts, options.pgbouncer_pool_size)
        self.lifecycle = Lifecycle(self.app, options, trackers, sync_trackers, topology, ConnectionTracker())
        self.retry_after = options.retry_after
        self.in_flight = InFlight.for_retry_after(options.retry_after)  # each request's record
        self.stats_path = options.stats_path
        # What a request's path is tested for first: without a stats path, a string no test is made for (_stats).
        self.stats_probe = options.stats_path if options.stats_path is not None else "\x00"
        self.opentelemetry = _otel.enroll(self.all_trackers())
        self.sessionmakers = {name: async_sessionmaker(eng, expire_on_commit=False) for name, eng in named.items()}
        #: This app's ORM commits that started after their response went out (its /metrics shows them).
        self.late_commits = LateCommits()
        if not event.contains(Session, "before_commit", on_session_commit):
            event.listen(Session, "before_commit", on_session_commit)
        # The pool endpoints show the sync_engines too ("sync:0", ...), as PoolCollector and OpenTelemetry do.
        shown = {**named, **{tracker.name: tracker.engine for tracker in sync_trackers}}
        self.stats_app = PoolStatsApp(
            shown,
            token=options.stats_token,
            # From a stop signal on, as the app refuses new requests (not only from the lifespan shutdown on).
            shutting_down=lambda: self.lifecycle.shutting_down or self.lifecycle.server_stopping,
            late_commits=self.late_commits.counts,
        )

    # -- public helpers ----------------------------------------------------------------------------
    @classmethod
    def current(cls) -> DBPoolMiddleware:
        """The middleware whose lifespan is running in this context: from the wrapped app's own lifespan (a
        FastAPI or Starlette ``lifespan``, also when it was added with ``add_middleware``) reach
        ``register_task`` and ``sessionmaker``. In a request, ``request.state.asgi_dbpool`` is the same."""
        middleware = _CURRENT.get()
        if middleware is None:
            raise RuntimeError(
                "no DBPoolMiddleware lifespan is running in this context; call DBPoolMiddleware.current() from the "
                "wrapped app's lifespan, or use request.state.asgi_dbpool in a request."
            )
        return middleware

    @property
    def shutting_down(self) -> bool:
        """True from the first step of this app's shutdown on (``request.state.asgi_dbpool.shutting_down``)."""
        return self.lifecycle.shutting_down

    @property
    def monitor(self) -> PoolMonitor:
        return self.lifecycle.monitor

    @property
    def topology(self) -> Topology:
        return self.lifecycle.topology

    def sessionmaker(self, name: str | None = None) -> async_sessionmaker[AsyncSession]:
        """The ``async_sessionmaker`` of engine ``name`` (default: the first engine)."""
        if name is None:
            return next(iter(self.sessionmakers.values()))
        try:
            return self.sessionmakers[name]
        except KeyError:
            raise KeyError(f"no engine named {name!r}; known: {sorted(self.sessionmakers)}.") from None

    def register_task(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Have shutdown cancel and await ``task`` (step 4), before the app's own shutdown runs."""
        return self.lifecycle.register(task)

    def shutdown_trigger(self, trigger: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[None]]:
        """Wrap the ``shutdown_trigger`` of an in-process server so open WebSockets close when it fires.

        For ``hypercorn.asyncio.serve(app, config, shutdown_trigger=middleware.shutdown_trigger(stop.wait))``:
        on Python 3.12+ hypercorn waits for every connection to close *before* it sends ``lifespan.shutdown``
        (pgjones/hypercorn#308), so an open WebSocket would hold the process forever. When ``trigger`` returns,
        the open WebSockets are closed with 1012 (as uvicorn does), new ones are refused, and the server goes on.
        """

        async def trigger_then_close_websockets() -> None:
            await trigger()
            await self.lifecycle.server_stops(SERVICE_RESTART)

        return trigger_then_close_websockets

    def all_trackers(self) -> list[PoolTracker]:
        return self.lifecycle.all_trackers

    # -- ASGI --------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # The HTTP hot path, inline. A substring test first (one operation): a path routed to the stats app
            # always contains its path (stats_probe: the stats path, or a string no path is checked for).
            if self.stats_probe in scope["path"] and await self._stats(scope, receive, send):
                return
            try:  # _note_state, inline (a subscript, not get(): a method call less per request)
                state = scope["state"]
                if STATE_KEY not in state:
                    state[STATE_KEY] = self
            except (KeyError, TypeError):  # no lifespan state (a server or client without it), or None
                scope["state"] = {STATE_KEY: self}
            lifecycle = self.lifecycle
            if not lifecycle.serving:  # shutting down, the server began to stop, or no lifespan is running
                if lifecycle.state == "stopping" or lifecycle.state == "running":  # running: a stop signal came
                    await respond(send, 503, SHUTTING_DOWN, retry_after=self.retry_after, close=True)
                    return
                await lifecycle.enter_unhosted()  # left in request_ended (connections.watched)
            # A counter and the request in flight, which is also the app's send.
            connections = lifecycle.connections
            connections.http_in_flight += 1
            # InFlight.start, inline. Names read into locals before a call: CPython 3.11 specialises an attribute
            # load, not a method call on an instance attribute (a full type lookup at every request).
            new_request = self.in_flight
            request = new_request()
            request.scope = scope
            request.server_send = send
            request.done = request.responded = False
            request.holding = 0
            token = set_request(request)
            app = self.app
            try:
                await app(scope, receive, request.send)
            except asyncio.CancelledError:
                # A server stopping cancels request tasks (its graceful-shutdown timeout ran out, a forced exit):
                # then answer cleanly instead of a traceback and a 500 or a reset connection. Any other
                # cancellation (a timeout around the call, a task group, an outer middleware) is the caller's.
                if not (lifecycle.server_stopping or lifecycle.shutting_down or cancelled_by_server()):
                    raise
                task = current_task()
                if task is None:
                    raise
                task.uncancel()
                # Answered, or ended quietly when its response had started: raised, it would be a traceback.
                await answer_cancelled(scope, send, request, self.retry_after)
            except Exception:
                # A pool timeout (or a max_pending refusal) ended the request: 503 + Retry-After, not a 500.
                exhausted = request.exhausted
                if exhausted is None:
                    raise
                if request.answered:
                    return  # the app's own 500 was already turned into the 503 by request.send
                if not await respond(send, 503, POOL_EXHAUSTED, retry_after=self.retry_after, close=False):
                    raise
                exhausted.overload_answers += 1
            finally:
                request.done = True
                if request.holding:  # it leaves connections behind: a leak check compares their task with its own
                    request.task = current_task()
                reset_request(token)  # a caller in the same task (an outer wrapped app) gets its own back
                connections.http_in_flight -= 1
                if connections.watched:  # the shutdown's drain, or requests served without a lifespan
                    await lifecycle.request_ended()
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _stats(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Serve the stats endpoints if this request is for them; whether it was."""
        stats_path = self.stats_path
        if stats_path is None:
            return False
        path = route_path(scope) if scope.get("root_path") else scope["path"]
        if not (path.startswith(stats_path) and (len(path) == len(stats_path) or path[len(stats_path)] == "/")):
            return False
        root = scope.get("root_path", "") + stats_path
        await self.stats_app({**scope, "root_path": root, "path": root + path[len(stats_path) :]}, receive, send)
        return True

    def _note_state(self, scope: Scope) -> None:
        """Put this middleware in the request's state (``request.state.asgi_dbpool``), where the lifespan's did not."""
        try:
            state = scope["state"]
            if STATE_KEY not in state:
                state[STATE_KEY] = self
        except (KeyError, TypeError):  # no lifespan state (a server or client without it), or None
            scope["state"] = {STATE_KEY: self}

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.stats_probe in scope["path"] and await self._stats(scope, receive, send):
            return
        self._note_state(scope)
        lifecycle = self.lifecycle
        if lifecycle.state == "stopping" or (lifecycle.state == "running" and lifecycle.server_stopping):
            await send({"type": "websocket.close", "code": 1001})
        elif lifecycle.serving:
            await lifecycle.connections.websocket(self.app, scope, receive, send)
        else:
            await lifecycle.enter_unhosted()
            try:
                await lifecycle.connections.websocket(self.app, scope, receive, send)
            finally:
                await lifecycle.leave_unhosted()

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The lifespan conversation: one answer per server message, the work done by :class:`Lifecycle`.

        A failed startup or shutdown raises after its ``*.failed`` message, as a bare app does: test clients
        (Starlette's ``TestClient``, asgi-lifespan) learn of the failure only from that exception, and servers
        stay quiet about it (uvicorn, granian) or raise from ``send`` already (hypercorn). It raises what the
        wrapped app raised, or our own one-line :class:`StartupError`.

        A cancellation during our startup or shutdown closes everything, then propagates. One while waiting for
        the server's next message closes everything too; a server's (uvicorn's second Ctrl+C, ``asyncio.run``'s
        leftovers: the server no longer waits for us) then ends quietly, since a server prints whatever escapes
        here as a traceback, and anyone else's (a test's timeout, a task group) propagates, as bare.
        """
        state = scope.get("state")
        if state is not None:
            state[STATE_KEY] = self
        token = _CURRENT.set(self)  # the wrapped app's lifespan task is made below: it inherits this context
        lifecycle = self.lifecycle
        try:
            try:
                message = await receive()
            except asyncio.CancelledError:
                if await self._forced_exit(cancelled_by_server()):
                    return
                raise
            if message["type"] != "lifespan.startup":  # pragma: no cover - a server bug
                raise RuntimeError(f"expected lifespan.startup, got {message['type']!r}.")
            try:
                failure = await lifecycle.start(scope)
            except asyncio.CancelledError:
                await lifecycle.close_after_cancel()
                raise
            if failure is not None:
                line, error = failure
                await send({"type": "lifespan.startup.failed", "message": line})
                if error is not None and not (isinstance(error, StartupError) and _prints_raised(send)):
                    raise error
                return
            # A meter provider configured since construction (in the app's own startup, say) gets the histograms.
            self.opentelemetry = _otel.enroll(self.all_trackers())
            await send({"type": "lifespan.startup.complete"})
            if lifecycle.state == "stopped":  # a stop signal ended the startup: a SIGTERM held may end us now
                lifecycle.release_termination()
            try:
                message = await receive()
            except asyncio.CancelledError:
                if await self._forced_exit(cancelled_by_server()):
                    return
                raise
            if message["type"] != "lifespan.shutdown":  # pragma: no cover - a server bug
                logger.warning("expected lifespan.shutdown, got %r; shutting down anyway", message["type"])
            try:
                answer, why = await lifecycle.shutdown()
            except asyncio.CancelledError:
                await lifecycle.close_after_cancel()
                raise
            if answer != "failed":
                await send({"type": "lifespan.shutdown.complete"})
                return
            await send({"type": "lifespan.shutdown.failed", "message": why})
            error = lifecycle.inner.error if lifecycle.inner is not None else None
            if error is not None:
                raise error
        finally:
            _CURRENT.reset(token)
            # The conversation is over, answered or cut: a SIGTERM held meanwhile may end the process now.
            lifecycle.release_termination()

    async def _forced_exit(self, by_server: bool) -> bool:
        """Cancelled while waiting for the server's next message: close everything; whether to end quietly (the
        server's own cancellation, its forced exit) rather than propagate the cancellation."""
        await self.lifecycle.close_after_cancel(forced_exit=by_server)
        task = asyncio.current_task()
        if not by_server or task is None:
            return False
        task.uncancel()
        return True
