"""Asking a pool for a connection: the part of a checkout no pool event shows.

One :class:`Acquisition` per pool holds that state: the refusal gate (closed for shutdown), the tasks waiting
for a connection and how long they wait, pool timeouts, and ``max_pending`` fail-fast. The pool's ``_do_get``
(per pool instance) is wrapped to keep it. It also knows *who* is between asking and the checkout event, which
matters at shutdown: a task waiting in the pool's queue, or pre-pinging the record it was just given, holds a
connection no checkout event has shown yet; shutdown must stop it too, or the process exits with its pre-ping
in flight (PostgreSQL logs ``Connection reset by peer``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import exc as sa_exc

from ._checkout import current_task
from ._histogram import Histogram


class PoolClosedError(RuntimeError):
    """A connection was asked for after the middleware disposed the engine at shutdown."""

    __module__ = "asgi_dbpool"  # tracebacks name the public class, not a private module


class PoolOverloadedError(sa_exc.TimeoutError):
    """``max_pending`` tasks already wait for a connection: this checkout fails at once (a pool timeout)."""

    __module__ = "asgi_dbpool"  # tracebacks name the public class, not a private module


class Acquisition:
    """One pool's "asking for a connection" state; ``on_exhausted()`` hears of every timeout or refusal."""

    def __init__(self, name: str, on_exhausted: Callable[[], None]) -> None:
        self.name = name
        self.closed = False  # shutdown refuses every checkout from here on (until reopen)
        self.max_pending: int | None = None  # fail fast beyond this many waiting tasks; set by the middleware
        self.pending = 0  # tasks waiting for a connection now
        self.timeouts = 0  # checkouts that waited pool_timeout in vain
        self.rejected = 0  # checkouts refused at once by max_pending
        self.wait = Histogram()
        # Tasks between asking the pool and the checkout event (waiting in the queue, or pre-pinging a record).
        self.acquiring: set[asyncio.Task[Any]] = set()
        self.starting: dict[int, asyncio.Task[Any]] = {}  # record id -> task, until its checkout (or checkin)
        self._on_exhausted = on_exhausted

    def refusal(self) -> PoolClosedError:
        return PoolClosedError(
            f"engine {self.name!r} is closed for shutdown; no database connection is handed out or "
            "opened now. Finish database work before the app's lifespan shutdown completes."
        )

    def holders(self) -> set[asyncio.Task[Any]]:
        """Tasks asking for a connection, or holding one no checkout event has shown yet."""
        return {*self.acquiring, *self.starting.values()}

    def reopen(self) -> None:
        self.closed = False
        for key in [key for key, task in self.starting.items() if task.done()]:
            del self.starting[key]  # in place: the pool wrapper holds this dict

    def instrument(self, pool: Any) -> None:
        """Wrap ``pool._do_get`` so this state sees waits, timeouts and the tasks acquiring a connection."""
        original = pool._do_get
        acquiring = self.acquiring
        starting = self.starting
        wait = self.wait

        def _do_get() -> Any:
            if self.closed:  # before a record is taken: no pre-ping on a connection that is being disposed
                raise self.refusal()
            if self.max_pending is not None and self.pending >= self.max_pending:
                self.rejected += 1
                self._on_exhausted()
                raise PoolOverloadedError(
                    f"engine {self.name!r}: {self.pending} tasks already wait for a connection "
                    f"(max_pending={self.max_pending}); failing at once instead of waiting {pool._timeout:g}s"
                )
            self.pending += 1
            task = current_task()  # None for a sync engine used from a worker thread
            if task is not None:
                acquiring.add(task)  # a task waits in one _do_get at a time
            started = time.perf_counter()
            try:
                record = original()
            except sa_exc.TimeoutError:
                self.timeouts += 1
                self._on_exhausted()
                raise
            finally:
                self.pending -= 1
                if task is not None:
                    acquiring.discard(task)
            wait.observe(time.perf_counter() - started)
            if task is not None:
                starting[id(record)] = task  # until its checkout event (or checkin, if the pre-ping fails)
            return record

        pool._do_get = _do_get
