"""Asking a pool for a connection: the part of a checkout no pool event shows.

The pool's ``_do_get`` (per pool instance) is wrapped for: tasks waiting for a connection and how long they
wait, pool timeouts, ``max_pending`` fail-fast, the shutdown refusal, and *who* is between asking and the
checkout event. That last window matters at shutdown: a task waiting in the pool's queue, or pre-pinging the
record it was just given, holds a connection no checkout event has shown yet; shutdown must stop it too, or
the process exits with its pre-ping in flight (PostgreSQL logs ``Connection reset by peer``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc

from ._checkout import _current_task

if TYPE_CHECKING:
    from ._tracker import PoolTracker


class PoolClosedError(RuntimeError):
    """A connection was asked for after the middleware disposed the engine at shutdown."""


class PoolOverloadedError(sa_exc.TimeoutError):
    """``max_pending`` tasks already wait for a connection: this checkout fails at once (a pool timeout)."""


def instrument(tracker: PoolTracker, pool: Any) -> None:
    """Wrap ``pool._do_get`` so ``tracker`` sees waits, timeouts and the tasks acquiring a connection."""
    original = pool._do_get
    acquiring = tracker.acquiring
    starting = tracker.starting

    def _do_get() -> Any:
        if tracker.closed:  # before a record is taken: no pre-ping on a connection that is being disposed
            raise tracker.refusal()
        if tracker.max_pending is not None and tracker.pending >= tracker.max_pending:
            tracker.exhausted(rejected=True)
            raise PoolOverloadedError(
                f"asgi_dbpool: engine {tracker.name!r}: {tracker.pending} tasks already wait for a connection "
                f"(max_pending={tracker.max_pending}); failing at once instead of waiting {pool._timeout:g}s"
            )
        tracker.pending += 1
        task = _current_task()  # None for a sync engine used from a worker thread
        if task is not None:
            acquiring.add(task)  # a task waits in one _do_get at a time
        started = time.perf_counter()
        try:
            record = original()
        except sa_exc.TimeoutError:
            tracker.timeouts += 1
            tracker.exhausted(rejected=False)
            raise
        finally:
            tracker.pending -= 1
            if task is not None:
                acquiring.discard(task)
        tracker.wait.observe(time.perf_counter() - started)
        if task is not None:
            starting[id(record)] = task  # until its checkout event (or checkin, if the pre-ping fails)
        return record

    pool._do_get = _do_get
