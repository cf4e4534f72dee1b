"""Per-engine bookkeeping through pool events: who holds which connection, and closing what is left."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import weakref
from contextvars import ContextVar
from types import FrameType
from typing import TYPE_CHECKING, Any

import greenlet
from sqlalchemy import event
from sqlalchemy.util import greenlet_spawn

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

logger = logging.getLogger("asgi_dbpool")

# Frames from these places are not "the code that checked the connection out".
_INTERNAL_PARTS = ("/sqlalchemy/", "/asyncpg/", "/asyncio/", "/greenlet/", "/asgi_dbpool/", "/contextlib.py")
_internal_cache: dict[str, bool] = {}


class Unit:
    """One request or WebSocket handled through the middleware: its task, whether it has finished, and
    whether it tried an ORM commit (then a request cut off by the server may have saved its changes)."""

    __slots__ = ("committed", "done", "task")

    def __init__(self) -> None:
        self.task = _current_task()
        self.done = False
        self.committed = False


#: The request/WebSocket being served in this context (set by the middleware around each call).
current_unit: ContextVar[Unit | None] = ContextVar("asgi_dbpool_unit", default=None)


def _on_session_commit(session: Session) -> None:
    """Mark the request as having tried a COMMIT (before it is sent: a cut-off COMMIT may have landed).

    An ORM event, not a Core ``ConnectionEvents.commit`` listener: a Core listener on the engine switches on
    event dispatch for every statement (about 2% end to end here). Commits through ``AsyncConnection`` /
    ``engine.begin()`` directly are therefore not seen.
    """
    unit = current_unit.get()
    if unit is not None:
        unit.committed = True


class PoolClosedError(RuntimeError):
    """A connection was asked for after the middleware disposed the engine at shutdown."""


def _is_internal(filename: str) -> bool:
    try:
        return _internal_cache[filename]
    except KeyError:
        # "<...>" names generated code (SQLAlchemy decorators, frozen modules), never the caller.
        internal = filename.startswith("<") or any(part in filename for part in _INTERNAL_PARTS)
        _internal_cache[filename] = internal
        return internal


def checkout_site() -> tuple[str, int]:
    """``(file, line)`` of the innermost frame outside SQLAlchemy/asyncpg/asyncio, across greenlet boundaries.

    With the asyncio engine the checkout runs in a greenlet spawned by SQLAlchemy whose frames are all
    SQLAlchemy's (or a ``run_sync`` callable's): the walk starts in the awaiting (parent) greenlet, a few
    frames below the user's ``await``.
    """
    glet: Any = greenlet.getcurrent()
    if glet.parent is not None:
        glet = glet.parent
        frame: FrameType | None = glet.gr_frame
    else:
        frame = sys._getframe(1)
    while True:
        while frame is not None:
            filename = frame.f_code.co_filename
            if not _is_internal(filename):
                return filename, frame.f_lineno
            frame = frame.f_back
        glet = glet.parent
        if glet is None:
            return "<unknown>", 0
        frame = glet.gr_frame


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # a sync engine used from a worker thread
        return None


class Checkout:
    """One connection that is checked out right now (made on every checkout: kept small and cheap)."""

    __slots__ = ("owner", "proxy", "record", "since", "unit", "where")

    def __init__(
        self,
        record: ConnectionPoolEntry,
        proxy: weakref.ref[PoolProxiedConnection],
        owner: asyncio.Task[Any] | None,
        where: tuple[str, int],
        unit: Unit | None,
    ) -> None:
        self.record = record
        self.proxy = proxy
        self.owner = owner  # held until checkin: a finished task that leaked stays inspectable
        self.where = where
        self.since = time.monotonic()
        self.unit = unit

    def is_leak(self, current: asyncio.Task[Any] | None) -> bool:
        """True when nobody is working with this connection any more (its holder moved on or ended).

        A request's task may live on after the request (an in-process client, a test): once the request
        finished, a connection its task still holds was leaked. A task spawned from the request is judged
        by itself: still running means still working.
        """
        owner = self.owner
        if owner is None or owner.done() or owner is current:
            return True
        unit = self.unit
        return unit is not None and unit.done and unit.task is owner

    @property
    def site(self) -> str:
        return f"{self.where[0]}:{self.where[1]}"

    def describe(self, now: float) -> str:
        owner = self.owner
        who = "no task" if owner is None else f"task {owner.get_name()!r}" + (" (finished)" if owner.done() else "")
        return f"checked out at {self.site} {now - self.since:.1f}s ago by {who}"


class PoolTracker:
    """Listens to one engine's pool; survives ``engine.dispose()`` (events follow the recreated pool)."""

    def __init__(self, engine: Engine | AsyncEngine, name: str) -> None:
        self.async_engine: AsyncEngine | None = None
        if isinstance(engine, AsyncEngine):
            self.async_engine, engine = engine, engine.sync_engine
        self.engine: Engine = engine
        self.name = name
        self.checkouts: dict[int, Checkout] = {}
        self.invalidations = 0
        self.reclaimed = 0
        self.closed = False
        self._reclaiming: set[int] = set()
        event.listen(engine, "checkout", self._on_checkout)
        event.listen(engine, "checkin", self._on_checkin)
        event.listen(engine, "detach", self._on_detach)
        event.listen(engine, "invalidate", self._on_invalidate)
        event.listen(engine, "do_connect", self._on_do_connect)
        if not event.contains(Session, "before_commit", _on_session_commit):
            event.listen(Session, "before_commit", _on_session_commit)

    # -- pool events -------------------------------------------------------------------------
    def _on_checkout(self, dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection) -> None:
        if self.closed:
            # SQLAlchemy closes the pooled connection it was about to hand out (gracefully: we are in its greenlet).
            raise self._refusal()
        self.checkouts[id(record)] = Checkout(
            record, weakref.ref(proxy), _current_task(), checkout_site(), current_unit.get()
        )

    def _on_checkin(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        self.checkouts.pop(id(record), None)

    def _on_detach(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        self.checkouts.pop(id(record), None)

    def _on_invalidate(self, dbapi_connection: Any, record: ConnectionPoolEntry, exc: BaseException | None) -> None:
        if not self.closed and id(record) not in self._reclaiming:
            self.invalidations += 1

    def _on_do_connect(self, dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        if self.closed:
            raise self._refusal()

    def _refusal(self) -> PoolClosedError:
        return PoolClosedError(
            f"asgi_dbpool: engine {self.name!r} is closed for shutdown; no database connection is handed out or "
            "opened now. Finish database work before the app's lifespan shutdown completes."
        )

    def remove(self) -> None:
        """Stop listening (used when a middleware is discarded, e.g. in tests)."""
        for name, fn in (
            ("checkout", self._on_checkout),
            ("checkin", self._on_checkin),
            ("detach", self._on_detach),
            ("invalidate", self._on_invalidate),
            ("do_connect", self._on_do_connect),
        ):
            if event.contains(self.engine, name, fn):
                event.remove(self.engine, name, fn)

    # -- reading -----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, int]:
        """The report's JSON fields for this pool; ``overflow`` never negative."""
        pool: Any = self.engine.pool
        size = int(pool.size()) if hasattr(pool, "size") else 0
        checked_in = int(pool.checkedin()) if hasattr(pool, "checkedin") else 0
        checked_out = int(pool.checkedout()) if hasattr(pool, "checkedout") else len(self.checkouts)
        overflow = max(0, int(pool.overflow())) if hasattr(pool, "overflow") else 0
        return {
            "pool_size": size,
            "checked_in": checked_in,
            "checked_out": checked_out,
            "overflow": overflow,
            "invalid": self.invalidations,
        }

    def owners(self, current: asyncio.Task[Any] | None) -> set[asyncio.Task[Any]]:
        """Running tasks still working with a connection of this engine (``current`` left out)."""
        return {c.owner for c in self.checkouts.values() if not c.is_leak(current)}  # type: ignore[misc]

    # -- closing -----------------------------------------------------------------------------
    async def close_leaks(self) -> list[str]:
        """Hard-invalidate every connection still checked out, while the loop runs; one WARNING each."""
        now = time.monotonic()
        leaks = list(self.checkouts.values())
        reports = []
        for leak in leaks:
            text = leak.describe(now)
            reports.append(text)
            logger.warning("asgi_dbpool: engine %r: closing a leaked connection %s", self.name, text)
        await asyncio.gather(*(self._invalidate(leak) for leak in leaks))
        return reports

    async def _invalidate(self, leak: Checkout) -> None:
        proxy = leak.proxy()
        key = id(leak.record)
        self._reclaiming.add(key)
        try:
            # A dead or invalidated proxy was already handed back by SQLAlchemy itself.
            if proxy is not None and proxy.is_valid:
                # The proxy's hard invalidate closes the connection and checks the record back in, which also
                # detaches the proxy's garbage-collection finalizer: collecting the leaked session logs nothing.
                if self.async_engine is not None:
                    # In a greenlet, asyncpg's terminate() closes gracefully (Terminate message, 2 s cap).
                    await greenlet_spawn(proxy.invalidate)
                else:
                    await asyncio.to_thread(proxy.invalidate)
        except Exception:
            logger.exception("asgi_dbpool: engine %r: could not close a leaked connection %s", self.name, leak.site)
        finally:
            self._reclaiming.discard(key)
            self.checkouts.pop(key, None)
            self.reclaimed += 1

    def refuse_checkouts(self) -> None:
        """From now on every checkout fails at once with :class:`PoolClosedError` (until :meth:`reopen`)."""
        self.closed = True

    async def dispose(self) -> None:
        """Close every pooled connection (checkouts are refused from here on)."""
        self.closed = True
        if self.async_engine is not None:
            await self.async_engine.dispose(close=True)
        else:
            await asyncio.to_thread(self.engine.dispose, close=True)

    def reopen(self) -> None:
        self.closed = False


_registry: weakref.WeakKeyDictionary[Engine, PoolTracker] = weakref.WeakKeyDictionary()


def tracker_for(engine: Engine | AsyncEngine, name: str) -> PoolTracker:
    """The one tracker of ``engine`` (created on first use, shared by middleware and stats app)."""
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    tracker = _registry.get(sync_engine)
    if tracker is None:
        tracker = _registry[sync_engine] = PoolTracker(engine, name)
    elif tracker.async_engine is None and isinstance(engine, AsyncEngine):
        tracker.async_engine = engine
    return tracker


def name_engines(engines: Any) -> dict[str, Any]:
    """Normalise ``engine`` arguments: one engine becomes ``{"default": engine}``; a mapping is kept in order."""
    if isinstance(engines, AsyncEngine) or (hasattr(engines, "pool") and hasattr(engines, "dispose")):
        return {"default": engines}
    if hasattr(engines, "items"):
        named = dict(engines.items())
        if not named:
            raise ValueError("asgi_dbpool: the engine mapping is empty; pass at least one AsyncEngine.")
        for key, value in named.items():
            if not isinstance(key, str) or not (isinstance(value, AsyncEngine) or hasattr(value, "pool")):
                raise TypeError(f"asgi_dbpool: engine {key!r}: expected an AsyncEngine or Engine, got {value!r}.")
        return named
    raise TypeError(f"asgi_dbpool: expected an AsyncEngine or a mapping of names to engines, got {engines!r}.")
