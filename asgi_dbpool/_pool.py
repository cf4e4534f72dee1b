"""The pool class a tracked engine runs on: the engine's own pool class with a tracking ``_do_get`` and
``_do_return_conn`` in front.

Every checkout and checkin pass through these two methods, so they see what pool events show (who checked
out what, when it came back) and what no event shows (who waits, how long, timeouts, the shutdown refusal),
at the cost of two method calls: a ``checkout``/``checkin`` event listener would add SQLAlchemy's event
dispatch to every checkout. The class of the engine's pool is swapped for a subclass of itself, once, when
the tracker is made (for engines built by ``PoolSettings.create_async_engine()`` and by the user alike), and
``Pool.recreate()`` (``engine.dispose()``) builds the next pool from ``self.__class__``: the tracking
survives disposal.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import Any, ClassVar, Protocol

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import ConnectionPoolEntry, Pool

from ._acquire import Acquisition
from ._checkout import current_task


class Tracker(Protocol):
    """What the pool reports to (a :class:`~._tracker.PoolTracker`)."""

    acquisition: Acquisition

    def checked_out(self, record: ConnectionPoolEntry, task: asyncio.Task[Any] | None, now: float) -> None: ...

    def checked_in(self, record: ConnectionPoolEntry) -> None: ...


class TrackedPool(Pool):
    """Mixed in before the engine's pool class by :func:`track`; ``asgi_dbpool_tracker`` is that engine's.

    The class attributes carry a prefix so they never clash with a pool's own names.
    """

    asgi_dbpool_tracker: ClassVar[Tracker]
    asgi_dbpool_base: ClassVar[type[Pool]]  # the engine's own pool class: calling it is cheaper than super()

    def _do_get(self) -> ConnectionPoolEntry:
        tracker = self.asgi_dbpool_tracker
        acquisition = tracker.acquisition
        if acquisition.closed or acquisition.max_pending is not None:
            acquisition.ask(self)  # the shutdown refusal, max_pending: before a record is taken
        task = current_task()  # None for a sync engine used from a worker thread
        acquisition.pending += 1
        if task is not None:
            acquisition.acquiring.add(task)  # a task waits in one _do_get at a time
        started = perf_counter()
        try:
            record = self.asgi_dbpool_base._do_get(self)
        except sa_exc.TimeoutError:
            acquisition.timed_out()
            raise
        finally:
            acquisition.pending -= 1
            if task is not None:
                acquisition.acquiring.discard(task)
        now = perf_counter()
        acquisition.wait.observe(now - started)
        # Checked out from here on, pre-ping included: shutdown waits for this task like any holder.
        tracker.checked_out(record, task, now)
        return record

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        self.asgi_dbpool_tracker.checked_in(record)
        self.asgi_dbpool_base._do_return_conn(self, record)


def track(pool: Pool, tracker: Tracker) -> None:
    """Make ``pool`` (and every pool ``recreate()`` makes from it) report to ``tracker``."""
    base: Any = type(pool)
    if issubclass(base, TrackedPool):
        return
    namespace = {"asgi_dbpool_tracker": tracker, "asgi_dbpool_base": base, "__module__": __name__}
    pool.__class__ = type(f"Tracked{base.__name__}", (TrackedPool, base), namespace)
