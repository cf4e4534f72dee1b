"""The pool class a tracked engine runs on: the engine's own pool class with a tracking ``_do_get`` and
``_do_return_conn`` in front, and its connections opened through a tracking creator.

Every checkout and checkin pass through these two methods, so they see what pool events show (who checked
out what, when it came back) and what no event shows (who waits, how long, timeouts, the shutdown refusal).
This is the library's hot path, so its bookkeeping is written out here rather than spread over calls (each
Python call costs a few hundred instructions): the tracker's figures are updated in place, the checkout is
noted as a plain tuple, timings are appended to their histograms' pending lists. The two methods are
closures over the tracker and the base class's methods: a closure variable is the cheapest name to read
(a class attribute read through ``self`` is a full lookup in Python 3.11). A ``checkout``/``checkin`` event
listener would instead add SQLAlchemy's event dispatch to every checkout.

Engines built by ``PoolSettings`` are built on the tracked class (``poolclass=``, see :func:`tracked_class`).
For an engine built by the user, when its tracker is made, a pool that holds no connection is replaced by a fresh
pool of the tracked subclass, as ``engine.dispose()`` does (``Pool.recreate()`` builds the next pool from
``self.__class__``: the tracking survives disposal). A pool that already holds connections keeps them and its class:
its checkouts are followed through pool events (see :func:`_follow_with_events` for what they do not show). No
live pool is changed.
"""

from __future__ import annotations

import weakref
from asyncio import current_task
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import ConnectionPoolEntry, NullPool, Pool

from .acquire import Acquisition
from .checkout import Held, checkout_frames, get_current_request
from .histogram import FOLD_AT, Histogram

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine


class Tracker(Protocol):
    """What the pool updates and calls (a :class:`~.tracker.PoolTracker`)."""

    acquisition: Acquisition
    held: dict[int, Held]
    reported: set[int]
    use: Histogram
    leak_threshold: float | None
    checkouts_total: int
    checked_out_max: int
    pool_size_now: int
    overloaded: bool

    def note_overflow(self) -> None: ...

    def recovered(self) -> None: ...

    def fold(self) -> None: ...

    def returned_after_report(self, key: int, held: Held, seconds: float) -> None: ...

    def connected(self, record: ConnectionPoolEntry, seconds: float) -> None: ...

    disposal_deferred: bool

    def note_deferred_disposal(self) -> None: ...


class TrackedPool(Pool):
    """The base of every tracked pool class (see :func:`track`); ``asgi_dbpool_tracker`` is that engine's.

    The class attribute carries a prefix so it never clashes with a pool's own names.
    """

    asgi_dbpool_tracker: ClassVar[Tracker]


def track(engine: Engine, tracker: Tracker) -> None:
    """Make ``engine``'s pool (and every pool ``recreate()`` makes from it) report to ``tracker``."""
    pool: Any = engine.pool
    base = type(pool)
    if issubclass(base, TrackedPool) or pool in _FOLLOWED:
        return  # built with poolclass=tracked_class(...), or already followed
    if _holds_no_connection(pool):
        # As engine.dispose() does, the pool's own recreate() builds its successor with the same creation arguments
        # (engines sharing the pool read it from this one); called on a view whose class is the tracked one, the
        # live pool is only read. Its creator is wrapped by the tracked class's _should_wrap_creator as it is set.
        engine.pool = base.recreate(_AsTracked(pool, tracked_class(base, tracker)))
        return
    # A pool that holds connections (opened before the middleware was made; a StaticPool's one connection may be a
    # whole in-memory database) keeps them and its class: its checkouts are followed through pool events.
    _follow_with_events(engine, pool, tracker)


def tracked_class(base: type[Pool], tracker: Tracker) -> type[Pool]:
    """The subclass of the pool class ``base`` whose pools report to ``tracker``: what ``poolclass=`` takes for an
    engine not built yet (``PoolSettings.create_async_engine``), and what :func:`track` replaces an empty pool with."""
    if issubclass(base, TrackedPool):
        raise TypeError(f"{base!r} is a tracked pool class already; pass the engine's own pool class.")
    do_get, do_return_conn = _tracking(tracker, base._do_get, base._do_return_conn)
    namespace = {
        "asgi_dbpool_tracker": tracker,
        "_do_get": do_get,
        "_do_return_conn": do_return_conn,
        "_should_wrap_creator": _connecting(tracker, base._should_wrap_creator),
        **_disposing(tracker, base.dispose, base.recreate),
        "__module__": __name__,
        # SQLAlchemy names a pool's logger after its class (log._qual_logger_name_for_cls reads this private class
        # attribute first): the pool's log lines keep the engine's own pool class's logger. Tested on the lowest
        # and newest SQLAlchemy (test_tracked_pool).
        "_sqla_logger_namespace": getattr(base, "_sqla_logger_namespace", None) or f"{base.__module__}.{base.__name__}",
    }
    return type(f"Tracked{base.__name__}", (TrackedPool, base), namespace)


class _AsTracked:
    """A read-only view of a live pool whose class reads as the tracked class (see :func:`track`)."""

    __slots__ = ("_asgi_dbpool_class", "_asgi_dbpool_live")

    def __init__(self, pool: Pool, tracked: type[Pool]) -> None:
        object.__setattr__(self, "_asgi_dbpool_live", pool)
        object.__setattr__(self, "_asgi_dbpool_class", tracked)

    @property  # type: ignore[misc]
    def __class__(self) -> type[Pool]:  # type: ignore[override]  # recreate() builds from self.__class__
        return self._asgi_dbpool_class  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._asgi_dbpool_live, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{name!r}: a view of a live pool is read-only")


def _holds_no_connection(pool: Any) -> bool:
    """True for a pool that counts its connections and has none, idle or checked out, and for a NullPool."""
    if isinstance(pool, NullPool):
        return True
    try:
        return int(pool.checkedin()) == 0 and int(pool.checkedout()) == 0
    except AttributeError:  # StaticPool, SingletonThreadPool: they may hold one; followed through events
        return False


#: The pools followed through events, each with its tracker (weakly: the tracker holds the engine, which holds the
#: pool), so that an engine sharing the pool (``engine.execution_options(...)``) shares the tracker.
_FOLLOWED: weakref.WeakKeyDictionary[Pool, weakref.ref[Tracker]] = weakref.WeakKeyDictionary()


def tracker_of(pool: Pool) -> Tracker | None:
    """The tracker ``pool`` reports to, if any."""
    tracker = getattr(type(pool), "asgi_dbpool_tracker", None)
    if tracker is None:
        followed = _FOLLOWED.get(pool)
        tracker = followed() if followed is not None else None
    return tracker


def _follow_with_events(engine: Engine, pool: Pool, tracker: Tracker) -> None:
    """Track a pool that already holds connections through SQLAlchemy's events, leaving it as it is.

    What the events show: checkouts (who, where, how long), checkins, the connections the pool opens (timed from
    the dialect's ``do_connect`` to the pool's ``connect``) and, at shutdown, no new connection opened. What no
    event shows is left out: who waits for a connection and how long, pool timeouts, ``max_pending`` and the
    shutdown's refusal of an idle connection. ``engine.dispose()`` during the shutdown disposes at once. The
    listeners pass to every pool ``recreate()`` makes from this one (it hands them its event dispatch).
    """
    acquisition = tracker.acquisition
    held = tracker.held
    reported = tracker.reported
    connecting: dict[int, float] = {}

    def do_connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        if acquisition.closed:
            raise acquisition.refusal()
        connecting[id(record)] = perf_counter()

    def connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        started = connecting.pop(id(record), None)
        tracker.connected(record, perf_counter() - started if started is not None else 0.0)

    def checkout(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
        try:
            task = current_task()
        except RuntimeError:
            task = None
        request = get_current_request()
        if request is not None:
            if request.done:
                request = None
            else:
                request.holding += 1
        site, stack = checkout_frames(tracker.leak_threshold is not None)
        held[id(record)] = (record, task, site, request, stack, perf_counter())
        total = tracker.checkouts_total = tracker.checkouts_total + 1
        out = len(held)
        if out > tracker.checked_out_max:
            tracker.checked_out_max = out
        if out > tracker.pool_size_now:
            tracker.note_overflow()
        if not total % FOLD_AT:
            tracker.fold()

    def checkin(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        key = id(record)
        checkout = held.pop(key, None)
        if checkout is not None:
            request = checkout[3]
            if request is not None:
                request.holding -= 1
            seconds = perf_counter() - checkout[5]
            observe = tracker.use.add  # a slot load (see _do_get)
            observe(seconds)
            if reported and key in reported:
                tracker.returned_after_report(key, checkout, seconds)

    _FOLLOWED[pool] = weakref.ref(tracker)
    event.listen(engine, "do_connect", do_connect)
    for name, listener in (("connect", connect), ("checkout", checkout), ("checkin", checkin)):
        event.listen(pool, name, listener)


def _connecting(
    tracker: Tracker, base_wrap: Callable[[Any, Any], Callable[[Any], Any]]
) -> Callable[[Any, Any], Callable[[Any], Any]]:
    """The tracked pool's ``_should_wrap_creator``: the function a pool calls to open each connection (a new one or
    a reconnect after invalidation), refused once the pool is closed for shutdown, and timed.

    A ``do_connect`` listener would do the same, but any dialect event listener makes SQLAlchemy look for
    ``do_execute`` listeners at every statement. ``_should_wrap_creator`` is private to SQLAlchemy: the same on
    2.0.44 and 2.1.9; the tests time connections on both (``tracker.create``).
    """
    acquisition = tracker.acquisition

    def _should_wrap_creator(pool: Any, creator: Any) -> Callable[[Any], Any]:
        invoke = base_wrap(pool, creator)

        def open_connection(record: Any) -> Any:
            if acquisition.closed:
                raise acquisition.refusal()
            started = perf_counter()
            connection = invoke(record)
            tracker.connected(record, perf_counter() - started)
            return connection

        return open_connection

    return _should_wrap_creator


def _disposing(
    tracker: Tracker, base_dispose: Callable[[Any], None], base_recreate: Callable[[Any], Any]
) -> dict[str, Callable[[Any], Any]]:
    """The tracked pool's ``dispose`` and ``recreate``: while its app shuts down, until the shutdown's own last step,
    ``engine.dispose()`` leaves the pool as it is (``recreate()`` returns it) and the last step disposes it.

    A lifespan or a plugin that disposes the engine as it exits (advanced-alchemy's does) would otherwise close the
    pool before the app's remaining shutdown code ran, which then opened new connections, and before the shutdown
    reclaimed the leaked ones; the engine would be disposed twice.
    """

    def dispose(pool: Any) -> None:
        if tracker.disposal_deferred:
            tracker.note_deferred_disposal()
            return
        base_dispose(pool)

    def recreate(pool: Any) -> Any:
        if tracker.disposal_deferred:
            return pool
        return base_recreate(pool)

    return {"dispose": dispose, "recreate": recreate}


def _tracking(
    tracker: Tracker,
    base_get: Callable[[Any], ConnectionPoolEntry],
    base_return: Callable[[Any, ConnectionPoolEntry], None],
) -> tuple[Callable[[Any], ConnectionPoolEntry], Callable[[Any, ConnectionPoolEntry], None]]:
    """The tracked pool's ``_do_get`` and ``_do_return_conn`` for ``tracker``, around the base class's."""
    acquisition = tracker.acquisition
    acquiring = acquisition.acquiring
    held = tracker.held
    reported = tracker.reported
    wait, use = acquisition.wait, tracker.use

    def _do_get(pool: Any) -> ConnectionPoolEntry:
        if acquisition.guarded:
            acquisition.ask(pool)  # the shutdown refusal, max_pending: before a record is taken
        try:
            task = current_task()
        except RuntimeError:  # a sync engine used from a worker thread (checkout.current_task, one call less)
            task = None
        acquisition.pending += 1
        if task is not None:
            acquiring.add(task)  # a task waits in one _do_get at a time
        started = perf_counter()
        try:
            record = base_get(pool)
        except sa_exc.TimeoutError:
            acquisition.timed_out()
            raise
        finally:
            acquisition.pending -= 1
            if task is not None:
                acquiring.discard(task)
        now = perf_counter()
        # Histogram.add read into a local first: CPython 3.11 specialises the load of a slot, not a method call
        # on one (that is a full type lookup on every checkout).
        observe = wait.add
        observe(now - started)
        # Checked out from here on, pre-ping included: shutdown waits for this task like any holder.
        request = get_current_request()
        if request is not None:
            if request.done:  # an in-process caller's task after its request (see InFlight)
                request = None
            else:
                request.holding += 1
        site, stack = checkout_frames(tracker.leak_threshold is not None)
        held[id(record)] = (record, task, site, request, stack, now)
        total = tracker.checkouts_total = tracker.checkouts_total + 1
        out = len(held)
        if out > tracker.checked_out_max:
            tracker.checked_out_max = out
        if out > tracker.pool_size_now:  # only then can the pool have opened overflow connections
            tracker.note_overflow()
        if not total % FOLD_AT:  # the pending timings into their histograms: a bound on their memory
            tracker.fold()
        return record

    def _do_return_conn(pool: Any, record: ConnectionPoolEntry) -> None:
        if tracker.overloaded and not acquisition.pending:  # a connection is free and nobody waits: it is over
            tracker.recovered()
        key = id(record)
        checkout = held.pop(key, None)
        if checkout is not None:
            request = checkout[3]
            if request is not None:
                request.holding -= 1
            seconds = perf_counter() - checkout[5]
            observe = use.add  # a slot load (see _do_get)
            observe(seconds)
            if reported and key in reported:
                tracker.returned_after_report(key, checkout, seconds)
        base_return(pool, record)

    return _do_get, _do_return_conn
