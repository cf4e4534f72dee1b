"""Per-engine bookkeeping: who holds which connection, timings, and closing what is left."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from ..base.records import fields
from .acquire import Acquisition, PoolClosedError, PoolOverloadedError
from .checkout import Checkout, Held, get_current_request
from .dialects import abort_if_closing, wait_closed
from .histogram import Histogram
from .tracked_pool import track, tracked_class

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import ConnectionPoolEntry, Pool

__all__ = ["PoolClosedError", "PoolOverloadedError", "PoolTracker"]

logger = logging.getLogger("asgi_dbpool")


def proxies_of(records: list[ConnectionPoolEntry]) -> dict[int, PoolProxiedConnection]:
    """The connection each checked-out pool entry in ``records`` was handed out as (its holder's proxy), by ``id()``
    of the entry, for those that still have one.

    SQLAlchemy's public API leads from a proxy to its entry, not back (the way back is the entry's private
    ``fairy_ref``, whose semantics changed from 2.0 to 2.1); a ``checkout`` event listener would note it, but at the
    cost of SQLAlchemy's event dispatch on every checkout. So the proxies are found among the objects that refer to
    the entries: one walk of the garbage collector's objects, only when leaked connections are closed (the shutdown,
    or the end of requests served without a lifespan), for all of an engine's leaks at once. A proxy checked back
    in has dropped its entry; one that is no longer valid was handed back by SQLAlchemy itself.
    """
    by_connection = {id(record.dbapi_connection): id(record) for record in records if record.dbapi_connection}
    found: dict[int, PoolProxiedConnection] = {}
    for referrer in gc.get_referrers(*records):
        if isinstance(referrer, PoolProxiedConnection) and referrer.is_valid and not referrer.is_detached:
            key = by_connection.get(id(referrer.dbapi_connection))
            if key is not None:
                found[key] = referrer
    return found


class PoolTracker:
    """Keeps one engine's pool figures and checkouts; survives ``engine.dispose()`` (the recreated pool reports
    here too).

    The pool itself reports checkouts, checkins and the connections it opens (:mod:`.tracked_pool`); pool events give
    invalidations and detaches; who waits, how long, timeouts and the shutdown refusal are the pool's
    :class:`Acquisition` (see :mod:`.acquire`).
    """

    def __init__(self, engine: Engine | AsyncEngine | None, name: str) -> None:
        """``engine=None``: a tracker for an engine not built yet, whose ``poolclass=`` is :meth:`pool_class`; the
        engine is given by :meth:`attach` and the name by the first middleware (see ``registry.tracker_for``)."""
        self.async_engine: AsyncEngine | None = None
        self.engine: Engine
        self.name = name
        self.named = engine is not None
        # What the pool notes per checkout (see TrackedPool), by id() of the pool entry; read via checkouts.
        self.held: dict[int, Held] = {}
        self.reported: set[int] = set()  # ids of the entries a leak WARNING named
        self.invalidations = self.reclaimed = self.leaks = 0
        self.checked_out_max = self.overflow_max = self.checkouts_total = self.overflow_checkouts = 0
        self.server: dict[str, int] = {}  # server settings read at startup (budget check, advice)
        self.use, self.create = Histogram(), Histogram()
        self.acquisition = Acquisition(name, self.exhausted)
        self.leak_threshold: float | None = None  # seconds; set by the middleware (stacks captured only then)
        self.owner: weakref.ref[Any] | None = None  # the Lifecycle whose options apply (see Lifecycle.claim)
        self.overload_answers = 0  # 503s the middleware answered because this pool was exhausted
        self.overloaded = False
        #: While the app shuts down: ``engine.dispose()`` waits for the shutdown's last step (see tracked_pool).
        self.disposal_deferred = False
        self.deferred_disposals = 0
        self._reclaiming: set[int] = set()
        # Every pool entry that opened a connection (idle or checked out): closing at shutdown reaches them all.
        self._entries: weakref.WeakSet[ConnectionPoolEntry] = weakref.WeakSet()
        self.pool_size_now = 0
        if engine is not None:
            self.attach(engine)

    def pool_class(self, base: type[Pool]) -> type[Pool]:
        """The ``poolclass=`` of an engine this tracker follows from its first pool on: a subclass of ``base``."""
        return tracked_class(base, self)

    def attach(self, engine: Engine | AsyncEngine) -> None:
        """Follow ``engine`` (once): its pool reports here from now on (see :mod:`.tracked_pool`)."""
        if isinstance(engine, AsyncEngine):
            self.async_engine, engine = engine, engine.sync_engine
        self.engine = engine
        self.pool_size_now = self.pool_size()  # the same for every pool engine.dispose() makes
        track(engine, self)  # checkouts and checkins reach checked_out / checked_in (see tracked_pool)
        event.listen(engine, "detach", self._on_detach)
        event.listen(engine, "invalidate", self._on_invalidate)

    def rename(self, name: str) -> None:
        """The name the first middleware gives an engine built before it (see ``registry.tracker_for``)."""
        self.name = self.acquisition.name = name
        self.named = True

    # -- checkouts and checkins (noted by the pool itself, see _pool.TrackedPool) ------------------
    @property
    def checkouts(self) -> dict[int, Checkout]:
        """The connections checked out now, by ``id()`` of their pool entry (a fresh view at every call)."""
        reported = self.reported
        return {key: Checkout(held, key in reported) for key, held in list(self.held.items())}

    def report_leak(self, checkout: Checkout) -> None:
        """Note that a leak WARNING names ``checkout`` (once each; its checkin is then reported too)."""
        checkout.reported = True
        self.reported.add(id(checkout.record))
        self.leaks += 1

    def returned_after_report(self, key: int, held: Held, seconds: float) -> None:
        """A connection a leak WARNING named came back after ``seconds``."""
        self.reported.discard(key)
        site = Checkout(held, True).site
        logger.info(
            "engine %r: the connection checked out at %s came back after %.1fs",
            self.name,
            site,
            seconds,
            extra=fields("leak_returned", self.name, site=site, held=seconds),
        )

    def note_overflow(self) -> None:
        """More connections are out than the pool's size: count the checkout when overflow connections exist."""
        pool: Any = self.engine.pool
        overflow = pool.overflow() if hasattr(pool, "overflow") else 0
        if overflow > 0:
            self.overflow_checkouts += 1
            if overflow > self.overflow_max:
                self.overflow_max = overflow

    def recovered(self) -> None:
        """A connection came back while nobody waits: the pool is no longer exhausted."""
        self.overloaded = False
        self._log_figures(logging.INFO, "recovered", "engine %r: pool no longer exhausted (%s)")

    def fold(self) -> None:
        """Fold the hot path's pending timings into their histograms (the pool calls it every FOLD_AT checkouts)."""
        self.acquisition.wait.fold()
        self.use.fold()

    # -- rare: pool events (invalidation, detach), a new connection (reported by the pool) ----------
    def _on_detach(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        self.held.pop(id(record), None)

    def _on_invalidate(self, dbapi_connection: Any, record: ConnectionPoolEntry, exc: BaseException | None) -> None:
        if not self.acquisition.closed and id(record) not in self._reclaiming:
            self.invalidations += 1

    def connected(self, record: ConnectionPoolEntry, seconds: float) -> None:
        """The pool opened a connection for ``record`` in ``seconds`` (see tracked_pool: refused while closed)."""
        self._entries.add(record)
        self.create.observe(seconds)

    def exhausted(self) -> None:
        """A checkout timed out or was refused: mark the request (its error becomes a 503), warn once."""
        request = get_current_request()
        if request is not None and not request.done:
            request.exhaust(self)
        if not self.overloaded:
            self.overloaded = True
            self._log_figures(
                logging.WARNING,
                "exhausted",
                "engine %r: pool exhausted (%s); answering 503 with Retry-After until it recovers",
            )

    def _log_figures(self, level: int, event: str, message: str) -> None:
        """Log ``message`` (``%r`` the engine's name, ``%s`` the pool's figures) with the figures as fields."""
        figures = self._figures()
        logger.log(
            level,
            message,
            self.name,
            ", ".join(f"{k}={v}" for k, v in figures.items()),
            extra=fields(event, self.name, **figures),
        )

    def _figures(self) -> dict[str, int]:
        snap, acquisition = self.snapshot(), self.acquisition
        return {
            "pool_size": snap["pool_size"],
            "checked_out": snap["checked_out"],
            "overflow": snap["overflow"],
            "waiting": acquisition.pending,
            "timeouts": acquisition.timeouts,
            "rejected": acquisition.rejected,
        }

    def pool_size(self) -> int:
        pool: Any = self.engine.pool
        return int(pool.size()) if hasattr(pool, "size") else 0

    def max_connections(self) -> int:
        pool: Any = self.engine.pool
        # QueuePool has no public accessor for max_overflow (size(), overflow() and timeout() are public); the
        # private attribute is the same on 2.0.44 and 2.1.9, where the connection budget tests run. Absent on other
        # pool classes, which open no overflow connections.
        return self.pool_size() + max(int(getattr(pool, "_max_overflow", 0)), 0)

    # -- reading -----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, int]:
        """The report's JSON fields for this pool; ``overflow`` never negative."""
        pool: Any = self.engine.pool
        size = int(pool.size()) if hasattr(pool, "size") else 0
        checked_in = int(pool.checkedin()) if hasattr(pool, "checkedin") else 0
        checked_out = int(pool.checkedout()) if hasattr(pool, "checkedout") else len(self.held)
        overflow = max(0, int(pool.overflow())) if hasattr(pool, "overflow") else 0
        return {
            "pool_size": size,
            "checked_in": checked_in,
            "checked_out": checked_out,
            "overflow": overflow,
            "invalid": self.invalidations,
        }

    def serving(self) -> dict[asyncio.Task[Any], str]:
        """The request (``METHOD /route``) each task holding a connection of this engine serves, where known."""
        return {c.owner: c.request.route() for c in self.checkouts.values() if c.owner and c.request is not None}

    def owners(self, current: asyncio.Task[Any] | None) -> set[asyncio.Task[Any]]:
        """Running tasks working with a connection of this engine, or getting one (``current`` left out)."""
        held = {c.owner for c in self.checkouts.values() if not c.is_leak(current)}
        return {t for t in held | self.acquisition.acquiring if t is not None and t is not current and not t.done()}

    # -- closing -----------------------------------------------------------------------------
    async def close_leaks(
        self, only: Callable[[Checkout], bool] | None = None, forced_exit: bool = False
    ) -> tuple[list[str], list[str]]:
        """Hard-invalidate every connection still checked out (``only`` those it accepts), while the loop runs; the
        reports of the leaks (one WARNING each) and of the connections the forced exit cut off (one INFO line each).

        At a server's forced exit (``forced_exit``: ``asyncio.run`` cancels every task at once) a holder that was
        cancelled had no chance to give its connection back: SQLAlchemy's own close task, cancelled before it ran,
        never checks it in. That connection was cut off, not leaked by the app's code.
        """
        now = time.perf_counter()
        leaks = [c for c in self.checkouts.values() if only is None or only(c)]
        reports: tuple[list[str], list[str]] = ([], [])
        for leak in leaks:
            text = leak.describe(now)
            owner = leak.owner
            if forced_exit and owner is not None and owner.cancelled():
                reports[1].append(text)
                logger.info(
                    "engine %r: closing a connection the forced exit cut off before its task gave it back: %s",
                    self.name,
                    text,
                    extra=fields("reclaim", self.name, site=leak.site, cut_off=True),
                )
                continue
            reports[0].append(text)
            logger.warning(
                "engine %r: closing a leaked connection %s",
                self.name,
                text,
                extra=fields("reclaim", self.name, site=leak.site),
            )
        proxies = proxies_of([leak.record for leak in leaks]) if leaks else {}
        await asyncio.gather(*(self._invalidate(leak, proxies.get(id(leak.record))) for leak in leaks))
        return reports

    async def _invalidate(self, leak: Checkout, proxy: PoolProxiedConnection | None) -> None:
        key = id(leak.record)
        self._reclaiming.add(key)
        try:
            # A dead or invalidated proxy was already handed back by SQLAlchemy itself.
            if proxy is not None and proxy.is_valid:
                # The proxy's hard invalidate closes the connection and checks the record back in, which also
                # detaches the proxy's garbage-collection finalizer: collecting the leaked session logs nothing,
                # and its holder closing it later finds it invalidated (no rollback on a closed connection).
                # The entry's own invalidate() would close the connection but leave the proxy valid: a later
                # session.close() then rolls back on it and raises (SQLAlchemy 2.0.44).
                if self.async_engine is not None:
                    # In a greenlet, asyncpg's terminate() closes gracefully (Terminate message, 2 s cap).
                    await greenlet_spawn(proxy.invalidate)
                else:
                    await asyncio.to_thread(proxy.invalidate)
        except Exception:
            logger.exception("engine %r: could not close a leaked connection %s", self.name, leak.site)
        finally:
            self._reclaiming.discard(key)
            self.held.pop(key, None)
            self.reclaimed += 1

    async def close_connections(self, seconds: float) -> int:
        """Close every open connection of an async engine at once, each gracefully (Terminate, then the server
        closes) for at most ``seconds``, else aborted on our side; return how many were aborted.

        The pool would close them one after the other, each waiting for a server that may never answer (a
        failover, a firewall dropping packets), and log the cut one at ERROR. Closed here, the pool's own close
        and the leak reclaim find them closed and return at once.
        """
        if self.async_engine is None:
            return 0
        drivers = [entry.driver_connection for entry in list(self._entries)]
        outcomes = await asyncio.gather(*(wait_closed(d, seconds) for d in drivers if d is not None))
        return outcomes.count(False)

    def abort_closing(self) -> None:
        """Abort the connections whose graceful close is still going on (the driver says closed, its socket is
        open): when the database does not answer, SQLAlchemy's own close of an invalidated connection (a query
        cancelled mid-flight) waits 2 s for it; a database that answers closes one in milliseconds."""
        for entry in list(self._entries):
            driver = entry.driver_connection
            if driver is not None:
                abort_if_closing(driver)

    def refuse_checkouts(self) -> None:
        """From now on every checkout fails at once with :class:`PoolClosedError` (until :meth:`reopen`)."""
        self.acquisition.closed = True

    def defer_disposal(self) -> None:
        """From now on ``engine.dispose()`` returns at once; :meth:`dispose` (the shutdown's last step) disposes."""
        self.disposal_deferred = True
        self.deferred_disposals = 0

    def end_deferral(self) -> None:
        self.disposal_deferred = False

    def note_deferred_disposal(self) -> None:
        """Someone called ``engine.dispose()`` while the app shuts down: said once per shutdown."""
        self.deferred_disposals += 1
        if self.deferred_disposals == 1:
            logger.info(
                "engine %r: engine.dispose() during the app's shutdown is deferred to the shutdown's last step "
                "(the app's remaining shutdown code may still use the engine)",
                self.name,
                extra=fields("dispose_deferred", self.name),
            )

    async def dispose(self) -> None:
        """Close every pooled connection (checkouts are refused from here on)."""
        self.acquisition.closed = True
        self.disposal_deferred = False
        if self.async_engine is not None:
            await self.async_engine.dispose(close=True)
        else:
            await asyncio.to_thread(self.engine.dispose, close=True)

    def reopen(self) -> None:
        self.acquisition.reopen()
