"""Asking a pool for a connection: the part of a checkout no pool event shows.

One :class:`Acquisition` per pool holds that state: the refusal gate (closed for shutdown), the tasks waiting
for a connection and how long they wait, pool timeouts, and ``max_pending`` fail-fast; the pool's ``_do_get``
keeps it (see :mod:`.tracked_pool`). It also knows *who* waits in the pool's queue, which matters at shutdown: such
a task is about to hold a connection, and shutdown must stop it too, or the process exits with its pre-ping in
flight (PostgreSQL logs ``Connection reset by peer``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sqlalchemy import exc as sa_exc

from .histogram import Histogram


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
        self._closed = False
        self._max_pending: int | None = None
        #: ``closed or max_pending is not None``: the one test a checkout makes before :meth:`ask`.
        self.guarded = False
        self.pending = 0  # tasks waiting for a connection now
        self.timeouts = 0  # checkouts that waited pool_timeout in vain
        self.rejected = 0  # checkouts refused at once by max_pending
        self.wait = Histogram()
        self.acquiring: set[asyncio.Task[Any]] = set()  # tasks waiting in the pool's queue for a record
        self._on_exhausted = on_exhausted

    @property
    def closed(self) -> bool:
        """Shutdown refuses every checkout from here on (until :meth:`reopen`)."""
        return self._closed

    @closed.setter
    def closed(self, value: bool) -> None:
        self._closed = value
        self.guarded = value or self._max_pending is not None

    @property
    def max_pending(self) -> int | None:
        """Fail fast beyond this many waiting tasks (set by the middleware)."""
        return self._max_pending

    @max_pending.setter
    def max_pending(self, value: int | None) -> None:
        self._max_pending = value
        self.guarded = self._closed or value is not None

    def refusal(self) -> PoolClosedError:
        return PoolClosedError(
            f"engine {self.name!r} is closed for shutdown; no database connection is handed out or "
            "opened now. Finish database work before the app's lifespan shutdown completes."
        )

    def reopen(self) -> None:
        self.closed = False

    def ask(self, pool: Any) -> None:
        """Before a checkout takes a record: refuse it when closed for shutdown, or when ``max_pending`` tasks wait."""
        if self.closed:  # before a record is taken: no pre-ping on a connection that is being disposed
            raise self.refusal()
        if self.max_pending is not None and self.pending >= self.max_pending:
            self.rejected += 1
            self._on_exhausted()
            raise PoolOverloadedError(
                f"engine {self.name!r}: {self.pending} tasks already wait for a connection "
                f"(max_pending={self.max_pending}); failing at once instead of waiting "
                f"{_pool_timeout(pool):g}s"
            )

    def timed_out(self) -> None:
        self.timeouts += 1
        self._on_exhausted()


def _pool_timeout(pool: Any) -> float:
    """The pool's ``pool_timeout`` (``QueuePool.timeout()``; 0 for pools that never wait)."""
    timeout = getattr(pool, "timeout", None)
    return float(timeout()) if callable(timeout) else 0.0
