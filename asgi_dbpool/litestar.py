"""Litestar: :class:`DBPoolPlugin` gives a Litestar app what ``DBPoolMiddleware`` gives a wrapped app.

Litestar imports are made only here, so ``import asgi_dbpool`` stays framework-free.

Litestar builds ``middleware=[...]`` per route: a middleware given that way never sees the lifespan (no startup
check, no shutdown, no stats endpoint). The plugin owns one :class:`DBPoolMiddleware` instead and drives its
:class:`~.lifecycle.lifecycle.Lifecycle` from Litestar's own lifespan, whose order is (``Litestar.lifespan``):
the lifespan context managers are entered in list order, then the ``on_startup`` hooks run; at shutdown the
managers exit in reverse order, then the ``on_shutdown`` hooks run in list order. So the plugin puts

- a lifespan manager first in ``lifespan``: our startup (one ``SELECT 1`` per engine, the budget check, the
  monitor) runs before any of the app's own lifespans and ``on_startup`` hooks; a failure raises our one-line
  :class:`~asgi_dbpool.StartupError`;
- a lifespan manager last in ``lifespan`` (last again at startup, after plugins initialised later appended
  theirs): the first thing to exit, it begins the middleware's ordered shutdown (the flag, WebSockets closed,
  in-flight requests drained, the monitor and registered tasks stopped) and lets Litestar go on once those steps
  are done; from then on an ``engine.dispose()`` in the app's shutdown code waits for the last step;
- an ``on_shutdown`` hook last: once the app's own lifespans exited and its ``on_shutdown`` hooks ran (they may
  still use the database), the shutdown reclaims leaked connections and disposes every engine, and only then
  Litestar answers the server.

The app's part of the shutdown is, to the lifecycle, the wrapped app's lifespan (step 5 of the middleware's
sequence): it gets the same share of ``shutdown_timeout``. Requests reach the middleware through an app-level
middleware (per route, but it sees every request: the tracking, leak reports and the 503 on an exhausted pool
need no more); the stats endpoints are an ASGI mount at ``stats_path``. When the server cancels the lifespan (a
forced exit), Litestar still unwinds it in that task: the app's hooks run, and the last hook closes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Unpack

from litestar.di import Provide
from litestar.handlers import asgi
from litestar.plugins import InitPluginProtocol
from litestar.types import Receive as LitestarReceive
from litestar.types import Scope as LitestarScope
from litestar.types import Send as LitestarSend
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from .asgi.middleware import _CURRENT, DBPoolMiddleware
from .base.records import fields
from .base.types import ASGIApp, Receive, Scope, Send
from .config.options import MiddlewareOptions
from .lifecycle.startup import StartupError

if TYPE_CHECKING:
    from contextvars import Token

    from litestar import Litestar
    from litestar.config.app import AppConfig
    from sqlalchemy.engine import Engine

__all__ = ["DBPoolOptions", "DBPoolPlugin"]

logger = logging.getLogger("asgi_dbpool")

#: The scope key under which a route's own ASGI app travels through the shared middleware.
_ROUTE_APP = "asgi_dbpool.route_app"


class DBPoolOptions(MiddlewareOptions, total=False):
    """``DBPoolMiddleware``'s keyword options (``**settings.middleware_options()`` among them)."""

    sync_engines: Iterable[Engine]
    install_log_filter: bool


class _Run:
    """One run of the app's lifespan, as the plugin sees it."""

    def __init__(self, token: Token[DBPoolMiddleware | None]) -> None:
        self.token = token
        self.app_stopping = False  # Litestar began its shutdown: the app's part waits for its own end
        self.asked = asyncio.Event()  # the lifecycle reached the app's part (steps 1-4 are done)
        self.app_done = asyncio.Event()  # the app's lifespans exited and its on_shutdown hooks ran
        self.stopping: asyncio.Future[Any] | None = None  # the lifecycle's shutdown


class DBPoolPlugin(InitPluginProtocol):
    """``Litestar(..., plugins=[DBPoolPlugin(engine, **settings.middleware_options())])``.

    ``engine`` is an :class:`AsyncEngine` or a mapping of names to engines (the first is the default); the options
    are ``DBPoolMiddleware``'s. ``session_dependency_key`` names the dependency that yields an ``AsyncSession`` of
    the default engine, closed after the handler (rolled back if it raised); ``None`` registers none. One plugin
    per app: its engines are managed by one running lifecycle at a time.
    """

    def __init__(
        self,
        engine: AsyncEngine | Mapping[str, AsyncEngine],
        *,
        session_dependency_key: str | None = "db_session",
        **options: Unpack[DBPoolOptions],
    ) -> None:
        self.middleware = DBPoolMiddleware(self._dispatch, engine, **options)
        self.session_dependency_key = session_dependency_key
        self._run: _Run | None = None
        self._lifespans: list[Any] = []  # the app's lifespan list (AppConfig.lifespan), once on_app_init ran

    # -- what the app uses ----------------------------------------------------------------------
    @property
    def shutting_down(self) -> bool:
        """True from the first step of this app's shutdown on."""
        return self.middleware.shutting_down

    def sessionmaker(self, name: str | None = None) -> async_sessionmaker[AsyncSession]:
        """The ``async_sessionmaker`` of engine ``name`` (default: the first engine)."""
        return self.middleware.sessionmaker(name)

    def register_task(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Have the shutdown cancel and await ``task`` before the app's own lifespans and hooks shut down."""
        return self.middleware.register_task(task)

    async def provide_session(self) -> AsyncIterator[AsyncSession]:
        """The session dependency: an ``AsyncSession`` of the default engine, rolled back if the handler raised,
        always closed (Litestar closes generator dependencies before the response is sent)."""
        async with self.middleware.sessionmaker()() as session:
            try:
                yield session
            except BaseException:
                await session.rollback()
                raise

    # -- Litestar ------------------------------------------------------------------------------
    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.lifespan.insert(0, self._lifespan)  # entered first, exits last of the lifespans
        app_config.lifespan.append(self._shutdown_begins)  # entered last, exits first (see _lifespan)
        self._lifespans = app_config.lifespan
        app_config.on_shutdown.append(self._shutdown_ends)  # after the app's own on_shutdown hooks
        app_config.middleware.insert(0, self._route)  # the outermost of each route's middleware
        stats_path = self.middleware.stats_path
        if stats_path is not None:
            # copy_scope=False: the stats app gets a scope of its own (Litestar 2.10 puts the unknown keyword in opt)
            mount = asgi(stats_path, is_mount=True, name="asgi_dbpool_stats", copy_scope=False)
            app_config.route_handlers.append(mount(self._stats))
        if self.session_dependency_key is not None:
            app_config.dependencies[self.session_dependency_key] = Provide(self.provide_session)
        return app_config

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Litestar) -> AsyncIterator[None]:
        """Our startup, before the app's own; a failure raises our one-line ``StartupError``."""
        if app.on_shutdown and app.on_shutdown[-1] != self._shutdown_ends:
            logger.warning(
                "on_shutdown hooks added after DBPoolPlugin (by a plugin listed after it) run after the engines "
                "are disposed; list DBPoolPlugin after that plugin",
                extra=fields("order"),
            )
        self._last_to_exit()
        self._run = _Run(_CURRENT.set(self.middleware))  # DBPoolMiddleware.current() in the app's lifespans
        lifecycle = self.middleware.lifecycle
        try:
            failure = await lifecycle.start({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}})
        except asyncio.CancelledError:
            await lifecycle.close_after_cancel()
            raise
        if failure is not None:
            line, error = failure
            raise error if error is not None else StartupError(line)
        yield

    def _last_to_exit(self) -> None:
        """Put ``_shutdown_begins`` last in the lifespan list again, so that it exits first.

        Plugins initialised after this one append lifespans after it (advanced-alchemy's ``SQLAlchemyPlugin`` adds
        its init plugin at the end of the plugin list; its lifespan disposes the engine as it exits). Litestar
        enters the lifespans by iterating the very list ``on_app_init`` was given (``AppConfig.lifespan``) and is
        entering ``_lifespan`` now, which comes before ``_shutdown_begins``: moving that one to the end is seen.
        """
        managers, begins = self._lifespans, self._shutdown_begins
        if managers and begins in managers and managers[-1] != begins:
            managers.remove(begins)
            managers.append(begins)

    @contextlib.asynccontextmanager
    async def _shutdown_begins(self, app: Litestar) -> AsyncIterator[None]:
        """The first to exit: the shutdown's flag, WebSockets, drain and tasks, before the app's own shutdown. (Also
        when an on_startup hook failed: Litestar then runs the shutdown side too, and reports the failure.)"""
        cancelled = False
        try:
            yield
        except asyncio.CancelledError:  # a forced exit: the app's shutdown code runs on; the last hook closes all
            cancelled = True
            raise
        finally:
            if not cancelled:
                await self._begin()

    async def _shutdown_ends(self) -> None:
        """The last on_shutdown hook: the app's part is over; reclaim leaked connections and dispose the engines."""
        run, self._run = self._run, None
        if run is None:
            return
        try:
            if run.stopping is None:  # a forced exit, or a lifespan before our last failed to start: all of it now
                run.app_stopping = True
                run.stopping = asyncio.ensure_future(self.middleware.lifecycle.shutdown())
            run.app_done.set()
            try:
                await asyncio.shield(run.stopping)
            except asyncio.CancelledError:
                await self._abort(run.stopping)
                raise
        finally:
            _CURRENT.reset(run.token)
            # Litestar's conversation with the server ends with this hook: a SIGTERM held meanwhile (where the
            # server leaves it unhandled) may end the process now, everything closed.
            self.middleware.lifecycle.release_termination()

    async def _begin(self) -> None:
        run = self._run
        if run is None or run.stopping is not None:
            return
        run.app_stopping = True
        run.stopping = stopping = asyncio.ensure_future(self.middleware.lifecycle.shutdown())
        asked = asyncio.ensure_future(run.asked.wait())
        try:  # cancelled meanwhile, the shutdown goes on: the last hook waits for it (or closes everything)
            await asyncio.wait([stopping, asked], return_when=asyncio.FIRST_COMPLETED)
        finally:
            asked.cancel()

    async def _abort(self, stopping: asyncio.Future[Any]) -> None:
        """Cancelled: stop the shutdown under way (waiting for its end), then close everything at once."""
        stopping.cancel()
        while not stopping.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([stopping])
        lifecycle = self.middleware.lifecycle
        await lifecycle.close_after_cancel()
        lifecycle.release_termination()

    # -- ASGI ----------------------------------------------------------------------------------
    def _route(self, app: ASGIApp) -> Any:
        """The app-level middleware: each route's stack is served through the one middleware."""
        middleware = self.middleware

        async def through_middleware(scope: Scope, receive: Receive, send: Send) -> None:
            scope[_ROUTE_APP] = app
            await middleware(scope, receive, send)

        return through_middleware

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app the middleware wraps: a request's route, or the app's part of the lifespan."""
        if scope["type"] == "lifespan":
            await self._app_lifespan(receive, send)
            return
        route: ASGIApp = scope.pop(_ROUTE_APP)
        await route(scope, receive, send)

    async def _app_lifespan(self, receive: Receive, send: Send) -> None:
        """The app's own lifespan as the lifecycle drives it: its startup has run by the time the server hears
        ours; its shutdown is Litestar's, from the moment the lifecycle asks until the last on_shutdown hook."""
        run = self._run
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        if run is not None:
            run.asked.set()
            if run.app_stopping:  # else a SIGTERM began the shutdown and Litestar was not told: nothing to wait for
                await run.app_done.wait()
        await send({"type": "lifespan.shutdown.complete"})

    async def _stats(self, scope: LitestarScope, receive: LitestarReceive, send: LitestarSend) -> None:
        # Litestar passes the path below the mount; the root path is not part of it.
        await self.middleware.stats_app({**scope, "root_path": ""}, receive, send)  # type: ignore[arg-type]
