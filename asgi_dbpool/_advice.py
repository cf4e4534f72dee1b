"""Tuning advice from what the pools saw, by the report's rules, and the connection-budget check."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from sqlalchemy import text

from ._settings import mask_url
from ._tracker import PoolTracker

logger = logging.getLogger("asgi_dbpool")

#: pg_settings gives each value in its base unit (milliseconds for the timeouts), unlike current_setting().
_SERVER_QUERY = text(
    "SELECT name, setting::int FROM pg_settings WHERE name IN ('max_connections', 'superuser_reserved_connections', "
    "'reserved_connections', 'idle_session_timeout', 'idle_in_transaction_session_timeout')"
)
#: Enough checkouts to judge a pool by its high-water mark.
MIN_CHECKOUTS = 100


async def read_server(tracker: PoolTracker) -> dict[str, int]:
    """The server settings the advice and the budget need (read once per startup)."""
    assert tracker.async_engine is not None
    async with tracker.async_engine.connect() as conn:
        rows: dict[str, int] = {name: value for name, value in (await conn.execute(_SERVER_QUERY)).all()}
    server = {
        "max_connections": rows["max_connections"],
        "superuser_reserved_connections": rows.get("superuser_reserved_connections", 0),
        "reserved_connections": rows.get("reserved_connections", 0),  # PostgreSQL 16+
        "idle_session_timeout_ms": rows.get("idle_session_timeout", 0),  # PostgreSQL 14+
        "idle_in_transaction_session_timeout_ms": rows.get("idle_in_transaction_session_timeout", 0),
    }
    tracker.server = server
    return server


def workers_from_env(environ: dict[str, str] | None = None) -> int:
    raw = (os.environ if environ is None else environ).get("WEB_CONCURRENCY", "1")
    try:
        return max(int(raw), 1)
    except ValueError:
        return 1


def budget_warnings(trackers: Iterable[PoolTracker], workers: int) -> list[str]:
    """One line per database server whose connections the workers' pools could exhaust."""
    by_server: dict[tuple[Any, ...], list[PoolTracker]] = {}
    for t in trackers:
        if t.server:
            url = t.engine.url
            by_server.setdefault((url.host, url.port, url.query.get("host")), []).append(t)
    lines = []
    for group in by_server.values():
        server = group[0].server
        reserved = server["superuser_reserved_connections"] + server["reserved_connections"]
        available = server["max_connections"] - reserved
        per_worker = sum(t.max_connections() for t in group)
        if workers * per_worker > available:
            pools = " + ".join(f"({t.pool_size()} + {t.max_connections() - t.pool_size()})" for t in group)
            lines.append(
                f"asgi_dbpool: connection budget exceeded on {mask_url(group[0].engine.url)}: {workers} worker(s) "
                f"x {pools} = {workers * per_worker} connections > max_connections {server['max_connections']} "
                f"- reserved {reserved} = {available}; lower DB_POOL_SIZE / DB_MAX_OVERFLOW, raise max_connections, "
                "or put PgBouncer in front"
            )
    return lines


def advise(tracker: PoolTracker, cores: int | None = None) -> dict[str, Any]:
    """What to change and why, with the numbers, for one pool."""
    cores = cores or os.cpu_count() or 1
    pool: Any = tracker.engine.pool
    size, overflow = tracker.pool_size(), tracker.max_connections() - tracker.pool_size()
    recycle = int(getattr(pool, "_recycle", -1))
    checkouts = tracker.checkouts_total
    p50 = tracker.use.quantile(0.5)
    observed = {
        "pool_size": size,
        "max_overflow": overflow,
        "pool_recycle": recycle,
        "cpu_count": cores,
        "checkouts": checkouts,
        "checked_out_high_water": tracker.checked_out_max,
        "overflow_high_water": tracker.overflow_max,
        "overflow_checkouts": tracker.overflow_checkouts,
        "timeouts": tracker.timeouts,
        "use_time_p50_seconds": p50,
        "wait_time_p99_seconds": tracker.wait.quantile(0.99),
    }
    advice: list[dict[str, Any]] = []

    def say(setting: str, current: Any, suggested: Any, why: str) -> None:
        advice.append({"setting": setting, "current": current, "suggested": suggested, "why": why})

    grow_to = size + tracker.overflow_max
    if tracker.timeouts:
        say(
            "DB_POOL_SIZE",
            size,
            max(grow_to, size + 1),
            f"{tracker.timeouts} checkout(s) timed out waiting for a "
            "connection: grow the pool (or find the slow queries holding connections)",
        )
    elif checkouts and tracker.overflow_checkouts / checkouts > 0.1 and p50 is not None and p50 <= 0.1:
        share = 100 * tracker.overflow_checkouts / checkouts
        say(
            "DB_POOL_SIZE",
            size,
            grow_to,
            f"{share:.0f}% of checkouts ran in overflow while the median hold was "
            f"{p50 * 1000:.0f} ms or less: the pool is too small, not the queries too slow",
        )
    elif checkouts >= MIN_CHECKOUTS and tracker.checked_out_max < size / 2:
        say(
            "DB_POOL_SIZE",
            size,
            max(2 * tracker.checked_out_max, 1),
            f"at most {tracker.checked_out_max} of "
            f"{size} connections were ever checked out (far below half): shrink the pool",
        )
    if not 2 * cores <= size <= 4 * cores and not advice:
        say(
            "DB_POOL_SIZE",
            size,
            min(max(size, 2 * cores), 4 * cores),
            f"rule of thumb: 2-4 x {cores} CPU cores = {2 * cores}-{4 * cores} (more if the work is I/O bound)",
        )
    if not size <= overflow <= 2 * size:
        say(
            "DB_MAX_OVERFLOW",
            overflow,
            min(max(overflow, size), 2 * size),
            f"rule of thumb: 1-2 x DB_POOL_SIZE = {size}-{2 * size}",
        )
    idle_ms = tracker.server.get("idle_session_timeout_ms", 0)
    if idle_ms and (recycle <= 0 or recycle * 1000 >= idle_ms):
        say(
            "DB_POOL_RECYCLE",
            recycle,
            int(idle_ms * 0.8 / 1000),
            f"the server closes idle sessions after "
            f"{idle_ms / 1000:g}s (idle_session_timeout): recycle connections before that",
        )
    return {"observed": observed, "advice": advice}
