"""``DBPoolMiddleware``: the pure-ASGI wrapper that owns the database lifecycle of an app."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from . import _otel, _shutdown, _startup
from ._advice import Topology, workers_from_env
from ._checkout import Unit, current_unit
from ._connections import (
    CLOSE_FRAME_TIMEOUT,
    POOL_EXHAUSTED,
    SERVICE_RESTART,
    SHUTTING_DOWN,
    ConnectionTracker,
    answer_cancelled,
    overload_guard,
    respond,
)
from ._guard import mark_shutting_down
from ._lifespan import InnerLifespan
from ._monitor import PoolMonitor
from ._registry import PGBOUNCER_MODES, name_engines, tracker_for
from ._stats import PoolStatsApp, route_path
from ._tracker import PoolTracker
from ._types import STATE_KEY, ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

logger = logging.getLogger("asgi_dbpool")

DEFAULT_STATS_PATH = "/api/system/database/pool"


class DBPoolMiddleware:
    """Wrap an ASGI app so its database engines start checked, stay observable and close in order.

    ``engine`` is an :class:`AsyncEngine` or a mapping of names to engines (the first is the default).
    See the README for the shutdown sequence; every wait in it is bounded by ``shutdown_timeout``.
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
    ) -> None:
        self.app = app
        for option, value in (
            ("monitor_interval", monitor_interval),
            ("shutdown_timeout", shutdown_timeout),
            ("startup_timeout", startup_timeout),
        ):
            if not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"asgi_dbpool: {option}={value!r} must be a positive number of seconds.")
        if leak_threshold is not None and not (isinstance(leak_threshold, int | float) and leak_threshold > 0):
            raise ValueError(f"asgi_dbpool: leak_threshold={leak_threshold!r} must be a positive number or None.")
        for option, count in (
            ("workers", workers),
            ("pgbouncer_pool_size", pgbouncer_pool_size),
            ("max_pending", max_pending),
        ):
            if count is not None and not (isinstance(count, int) and count > 0):
                raise ValueError(f"asgi_dbpool: {option}={count!r} must be a positive whole number or None.")
        if not (isinstance(hosts, int) and hosts > 0):
            raise ValueError(f"asgi_dbpool: hosts={hosts!r} must be a positive whole number.")
        if pgbouncer not in (None, "off", "session", "transaction"):
            raise ValueError(f"asgi_dbpool: pgbouncer={pgbouncer!r} must be 'off', 'session', 'transaction' or None.")
        if not (isinstance(retry_after, int) and retry_after >= 0):
            raise ValueError(f"asgi_dbpool: retry_after={retry_after!r} must be a whole number of seconds (>= 0).")
        self.retry_after = retry_after
        if stats_path is not None and (not stats_path.startswith("/") or stats_path.rstrip("/") == ""):
            raise ValueError(
                f"asgi_dbpool: stats_path={stats_path!r} must start with '/' and not be '/'; or pass None."
            )
        named = name_engines(engine)
        for name, value in named.items():
            if not isinstance(value, AsyncEngine):
                raise TypeError(f"asgi_dbpool: engine {name!r} must be an AsyncEngine, got {value!r}.")
        self.engines: dict[str, AsyncEngine] = named
        self.trackers = [tracker_for(eng, name) for name, eng in named.items()]
        self.sync_trackers = [tracker_for(eng, f"sync:{i}") for i, eng in enumerate(sync_engines)]
        self.leak_threshold = leak_threshold
        self.max_pending = max_pending
        # The budget check's multipliers; WEB_CONCURRENCY is read now, so a malformed value fails at construction.
        self.topology = Topology(workers or workers_from_env(), hosts, pgbouncer_pool_size)
        self.pgbouncer = pgbouncer  # None: what PoolSettings.create_async_engine() recorded for each engine
        self.running = False  # between a successful startup and the end of shutdown
        _startup.claim(self, strict=False)
        self.opentelemetry = _otel.enroll(self.all_trackers())
        self.sessionmakers = {name: async_sessionmaker(eng, expire_on_commit=False) for name, eng in named.items()}
        self.shutdown_timeout = float(shutdown_timeout)
        self.startup_timeout = float(startup_timeout)
        self.install_log_filter = install_log_filter
        self.stats_path = None if stats_path is None else stats_path.rstrip("/")
        self.stats_app = PoolStatsApp(named, token=stats_token, shutting_down=lambda: self.shutting_down)
        self.monitor = PoolMonitor(self.trackers, monitor_interval, stopped=lambda: self.shutting_down)
        self.connections = ConnectionTracker()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.shutting_down = False
        self.server_stopping = False  # the server's shutdown trigger fired (see shutdown_trigger)
        self._monitor_task: asyncio.Task[None] | None = None
        self._leak_task: asyncio.Task[None] | None = None

    # -- public helpers ----------------------------------------------------------------------------
    def sessionmaker(self, name: str | None = None) -> async_sessionmaker[AsyncSession]:
        """The ``async_sessionmaker`` of engine ``name`` (default: the first engine)."""
        if name is None:
            return next(iter(self.sessionmakers.values()))
        try:
            return self.sessionmakers[name]
        except KeyError:
            raise KeyError(f"asgi_dbpool: no engine named {name!r}; known: {sorted(self.sessionmakers)}.") from None

    def register_task(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Have shutdown cancel and await ``task`` (step 4), before the app's own shutdown runs."""
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def shutdown_trigger(self, trigger: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[None]]:
        """Wrap the ``shutdown_trigger`` of an in-process server so open WebSockets close when it fires.

        For ``hypercorn.asyncio.serve(app, config, shutdown_trigger=middleware.shutdown_trigger(stop.wait))``:
        on Python 3.12+ hypercorn waits for every connection to close *before* it sends ``lifespan.shutdown``
        (pgjones/hypercorn#308), so an open WebSocket would hold the process forever. When ``trigger`` returns,
        the open WebSockets are closed with 1012 (as uvicorn does), new ones are refused, and the server goes on.
        """

        async def trigger_then_close_websockets() -> None:
            await trigger()
            self.server_stopping = True
            deadline = asyncio.get_running_loop().time() + CLOSE_FRAME_TIMEOUT
            closed, pending = await self.connections.close_websockets(deadline, SERVICE_RESTART)
            logger.info(
                "asgi_dbpool: the server is stopping: %d WebSocket(s) closed with %d%s",
                closed,
                SERVICE_RESTART,
                f" ({pending} close frame(s) not taken in time)" if pending else "",
            )

        return trigger_then_close_websockets

    def all_trackers(self) -> list[PoolTracker]:
        return [*self.trackers, *self.sync_trackers]

    def pgbouncer_mode(self, tracker: PoolTracker) -> str:
        """``off``, ``session`` or ``transaction``: the option, else what ``PoolSettings`` recorded for the engine;
        ``unknown`` when neither says but startup saw a connection pooler in front."""
        mode = self.pgbouncer or PGBOUNCER_MODES.get(tracker.engine, "off")
        return "unknown" if mode == "off" and self.pgbouncer is None and tracker.server.get("pooler") else mode

    # -- ASGI --------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" or kind == "websocket":
            stats_path = self.stats_path
            if stats_path is not None:
                path = route_path(scope) if scope.get("root_path") else scope["path"]
                if path.startswith(stats_path) and (len(path) == len(stats_path) or path[len(stats_path)] == "/"):
                    root = scope.get("root_path", "") + stats_path
                    sub_scope = {**scope, "root_path": root, "path": root + path[len(stats_path) :]}
                    await self.stats_app(sub_scope, receive, send)
                    return
            state = scope.get("state")
            if state is None:
                scope["state"] = {STATE_KEY: self}
            elif STATE_KEY not in state:
                state[STATE_KEY] = self
            if kind == "websocket":
                if self.shutting_down or self.server_stopping:
                    await send({"type": "websocket.close", "code": 1001})
                else:
                    await self.connections.websocket(self.app, scope, receive, send)
                return
            if self.shutting_down:
                await respond(send, 503, SHUTTING_DOWN, retry_after=self.retry_after, close=True)
                return
            # The HTTP hot path, inline: a counter and the request's unit (see _tracker.Unit).
            connections = self.connections
            connections.http_in_flight += 1
            unit = Unit()
            token = current_unit.set(unit)
            try:
                await self.app(scope, receive, overload_guard(send, unit, self.retry_after))
            except asyncio.CancelledError:
                # Only a server cancels a request task: its graceful-shutdown timeout ran out, or it is
                # force-exiting. Answer cleanly instead of a traceback and a 500 or a reset connection.
                task = unit.task
                if task is None:
                    raise
                task.uncancel()
                if not await answer_cancelled(scope, send, unit):
                    raise
            except Exception:
                # A pool timeout (or a max_pending refusal) ended the request: 503 + Retry-After, not a 500.
                exhausted = unit.exhausted
                if exhausted is None:
                    raise
                if unit.answered:
                    return  # the app's own 500 was already turned into the 503 by the guarded send
                if not await respond(send, 503, POOL_EXHAUSTED, retry_after=self.retry_after, close=False):
                    raise
                exhausted.overload_answers += 1
            finally:
                unit.done = True
                current_unit.reset(token)
                connections.http_done()
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":  # pragma: no cover - a server bug
            raise RuntimeError(f"asgi_dbpool: expected lifespan.startup, got {message['type']!r}.")
        state = scope.get("state")
        if state is not None:
            state[STATE_KEY] = self
        inner: InnerLifespan | None = None
        try:
            try:
                await self._startup()
            except _startup.StartupError as exc:
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            inner = InnerLifespan(self.app, scope)
            outcome, detail = await inner.start()
            if outcome == "failed":
                await _shutdown.close_engines(self, _shutdown.Budget(self.shutdown_timeout))
                await send({"type": "lifespan.startup.failed", "message": detail})
                return
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
        except asyncio.CancelledError:
            await _shutdown.force_close(self, inner)
            raise
        if message["type"] != "lifespan.shutdown":  # pragma: no cover - a server bug
            logger.warning("asgi_dbpool: expected lifespan.shutdown, got %r; shutting down anyway", message["type"])
        answer, why = await _shutdown.shutdown(self, inner)
        if answer == "failed":
            await send({"type": "lifespan.shutdown.failed", "message": why})
        else:
            await send({"type": "lifespan.shutdown.complete"})

    async def _startup(self) -> None:
        await _startup.startup(self)

    def _enter_shutdown(self) -> None:
        self.shutting_down = True
        mark_shutting_down()

    def _own_tasks(self) -> list[asyncio.Task[Any]]:
        return [task for task in (self._monitor_task, self._leak_task) if task is not None]
