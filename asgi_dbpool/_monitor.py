"""The pool monitor: reads every pool on an interval and warns once per episode of pressure."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from ._tracker import PoolTracker

logger = logging.getLogger("asgi_dbpool.monitor")

#: ``checked_out`` above this share of ``pool_size`` counts as pressure (the report's rule).
BUSY_RATIO = 0.8


def pressure(stats: dict[str, int]) -> str | None:
    """Why this pool snapshot is under pressure, or None."""
    reasons = []
    if stats["overflow"] > 0:
        reasons.append(f"overflow={stats['overflow']} > 0")
    if stats["checked_out"] > stats["pool_size"] * BUSY_RATIO:
        reasons.append(f"checked_out={stats['checked_out']} > {BUSY_RATIO} x pool_size={stats['pool_size']}")
    return " and ".join(reasons) or None


class PoolMonitor:
    """Check every pool each ``interval`` seconds; WARNING when pressure starts, INFO when it clears."""

    def __init__(
        self, trackers: Sequence[PoolTracker], interval: float, stopped: Callable[[], bool] = lambda: False
    ) -> None:
        if not interval > 0:
            raise ValueError(f"monitor_interval={interval!r} must be a positive number of seconds.")
        self.trackers = trackers
        self.interval = interval
        self.stopped = stopped
        self.under_pressure: dict[str, str] = {}
        self.ticks = 0

    def check(self) -> None:
        """One look at every pool (what the task does each tick; public for tests and tools)."""
        self.ticks += 1
        for tracker in self.trackers:
            try:
                stats = tracker.snapshot()
            except Exception:
                logger.exception("asgi_dbpool: could not read pool %r", tracker.name)
                continue
            reason = pressure(stats)
            figures = ", ".join(f"{k}={v}" for k, v in stats.items())
            if reason and tracker.name not in self.under_pressure:
                logger.warning(
                    "asgi_dbpool: pool %r under pressure: %s (%s); consider raising DB_POOL_SIZE or finding slow "
                    "queries and leaked sessions",
                    tracker.name,
                    reason,
                    figures,
                )
            elif not reason and tracker.name in self.under_pressure:
                logger.info("asgi_dbpool: pool %r back to normal (%s)", tracker.name, figures)
            if reason:
                self.under_pressure[tracker.name] = reason
            else:
                self.under_pressure.pop(tracker.name, None)

    async def run(self) -> None:
        """Loop until cancelled or until ``stopped()`` turns true; never raises on a failed check."""
        while not self.stopped():
            await asyncio.sleep(self.interval)
            if self.stopped():
                return
            try:
                self.check()
            except Exception:  # pragma: no cover - check() already guards each pool
                logger.exception("asgi_dbpool: pool monitor check failed")
