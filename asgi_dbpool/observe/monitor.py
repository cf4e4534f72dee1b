"""The pool monitor: reads every pool on an interval and warns once per episode of pressure; and the leak watch."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from ..base.records import fields
from ..pool.tracker import PoolTracker

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
                logger.exception("could not read pool %r", tracker.name)
                continue
            reason = pressure(stats)
            figures = ", ".join(f"{k}={v}" for k, v in stats.items())
            if reason and tracker.name not in self.under_pressure:
                logger.warning(
                    "pool %r under pressure: %s (%s); consider raising DB_POOL_SIZE or finding slow "
                    "queries and leaked sessions",
                    tracker.name,
                    reason,
                    figures,
                    extra=fields("pressure", tracker.name, reason=reason, **stats),
                )
            elif not reason and tracker.name in self.under_pressure:
                logger.info(
                    "pool %r back to normal (%s)", tracker.name, figures, extra=fields("normal", tracker.name, **stats)
                )
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
                logger.exception("pool monitor check failed")


def check_leaks(tracker: PoolTracker, now: float | None = None) -> int:
    """One WARNING, with the checkout stack, per connection held past ``leak_threshold`` (once each)."""
    if tracker.leak_threshold is None:
        return 0
    now = time.perf_counter() if now is None else now
    found = 0
    for checkout in list(tracker.checkouts.values()):
        if not checkout.reported and now - checkout.since > tracker.leak_threshold:
            tracker.report_leak(checkout)
            found += 1
            stack = "".join(f"\n    {line}" for line in checkout.stack or [checkout.site])
            logger.warning(
                "engine %r: connection held for %.1fs (leak threshold %gs)%s, checked out at:%s",
                tracker.name,
                now - checkout.since,
                tracker.leak_threshold,
                f" during {checkout.request.route()}" if checkout.request is not None else "",
                stack,
                extra=fields(
                    "leak",
                    tracker.name,
                    held=now - checkout.since,
                    threshold=tracker.leak_threshold,
                    stack=checkout.stack or [checkout.site],
                ),
            )
    return found


async def watch_leaks(trackers: Sequence[PoolTracker], threshold: float) -> None:
    """Report connections held past ``threshold`` seconds, checking twice per threshold (at most each second)."""
    tick = min(threshold / 2, 1.0)
    while True:
        await asyncio.sleep(tick)
        for tracker in trackers:
            check_leaks(tracker)
