"""Tuning advice from what the pools saw, by the report's rules, and the connection-budget check."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..config.parse import mask_url, workers_value
from ..pool.dialects import IDLE_TIMEOUT_NAME, read_settings
from ..pool.tracker import PoolTracker

logger = logging.getLogger("asgi_dbpool")

#: Enough checkouts to judge a pool by its high-water mark.
MIN_CHECKOUTS = 100


async def read_server(tracker: PoolTracker) -> dict[str, int]:
    """The server settings the advice and the budget need (read once per startup); empty for SQLite (no server)."""
    assert tracker.async_engine is not None
    async with tracker.async_engine.connect() as conn:
        server = await read_settings(conn)
    tracker.server = server or {}
    return tracker.server


def workers_from_env(environ: Mapping[str, str] | None = None) -> int:
    """Worker processes per host from ``WEB_CONCURRENCY`` (1 when unset); a malformed value is a ConfigError."""
    raw = (os.environ if environ is None else environ).get("WEB_CONCURRENCY")
    return 1 if raw is None else workers_value("WEB_CONCURRENCY", raw)


@dataclasses.dataclass(frozen=True)
class Topology:
    """What the budget check multiplies by: workers per host, hosts, and PgBouncer in front (if any)."""

    workers: int = 1
    hosts: int = 1
    pgbouncer_pool_size: int | None = None  # PgBouncer's server connections for the database/user, if known

    def processes(self) -> str:
        hosts = f" x {self.hosts} host(s)" if self.hosts > 1 else ""
        return f"{self.workers} worker(s){hosts}"


def budget_lines(
    trackers: Iterable[PoolTracker], topology: Topology, pgbouncer: Callable[[PoolTracker], str]
) -> list[tuple[int, str]]:
    """``(level, line)`` per database address: WARNING where the pools can exhaust the server's connections.

    Directly, every pool of every process is a server connection: workers x hosts x (size + overflow) must fit
    ``max_connections`` less the reserved ones. Through PgBouncer those are *client* connections; the server
    sees PgBouncer's own pool, which is what must fit (and, in session mode, each client connection holds one).
    """
    by_address: dict[tuple[Any, ...], list[PoolTracker]] = {}
    for t in trackers:
        if t.server:
            url = t.engine.url
            by_address.setdefault((url.host, url.port, url.query.get("host"), pgbouncer(t)), []).append(t)
    lines: list[tuple[int, str]] = []
    for (*_, mode), group in by_address.items():
        server = group[0].server
        reserved = server["superuser_reserved_connections"] + server["reserved_connections"]
        available = server["max_connections"] - reserved
        limit = f"max_connections {server['max_connections']} - reserved {reserved} = {available}"
        total = topology.workers * topology.hosts * sum(t.max_connections() for t in group)
        pools = " + ".join(f"({t.pool_size()} + {t.max_connections() - t.pool_size()})" for t in group)
        arithmetic = f"{topology.processes()} x {pools} = {total}"
        where = mask_url(group[0].engine.url)
        bouncer = topology.pgbouncer_pool_size
        pooler = "a connection pooler (DB_PGBOUNCER not set)" if mode == "unknown" else f"PgBouncer ({mode} pooling)"
        through = f"through {pooler} at {where}: {arithmetic} client connections"
        # PgBouncer is PostgreSQL's; for MySQL/MariaDB the remedies are the pool and the server's limit.
        postgres = group[0].engine.dialect.name == "postgresql"
        remedy = ", raise max_connections, or put PgBouncer in front" if postgres else " or raise max_connections"
        if mode == "off":
            if total <= available:
                continue
            line = (
                logging.WARNING,
                f"connection budget exceeded on {where}: {arithmetic} connections > {limit}; lower "
                f"DB_POOL_SIZE / DB_MAX_OVERFLOW{remedy}",
            )
        elif bouncer is None:
            line = (
                logging.INFO,
                f"connection budget {through} (PgBouncer's max_client_conn must allow them); the "
                f"server's limit ({limit}) applies to PgBouncer's own pool: set DB_PGBOUNCER_POOL_SIZE "
                "(pgbouncer_pool_size) to its default_pool_size + reserve_pool_size to have it checked",
            )
        elif bouncer > available:
            line = (
                logging.WARNING,
                f"connection budget exceeded {through} share PgBouncer's pool of {bouncer} server "
                f"connections > {limit}; lower PgBouncer's default_pool_size + reserve_pool_size or raise "
                "max_connections",
            )
        elif mode == "session" and total > bouncer:
            line = (
                logging.WARNING,
                f"connection budget exceeded {through} > PgBouncer's pool of {bouncer}: in session "
                "pooling each client connection holds a server connection, so checkouts beyond it wait in "
                "PgBouncer (query_wait_timeout); use transaction pooling or lower DB_POOL_SIZE / DB_MAX_OVERFLOW",
            )
        else:
            line = (
                logging.INFO,
                f"connection budget {through} share PgBouncer's pool of {bouncer} server connections <= {limit}",
            )
        lines.append(line)
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
        "timeouts": tracker.acquisition.timeouts,
        "use_time_p50_seconds": p50,
        "wait_time_p99_seconds": tracker.acquisition.wait.quantile(0.99),
    }
    advice: list[dict[str, Any]] = []

    def say(setting: str, current: Any, suggested: Any, why: str) -> None:
        advice.append({"setting": setting, "current": current, "suggested": suggested, "why": why})

    grow_to = size + tracker.overflow_max
    if tracker.acquisition.timeouts:
        say(
            "DB_POOL_SIZE",
            size,
            max(grow_to, size + 1),
            f"{tracker.acquisition.timeouts} checkout(s) timed out waiting for a "
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
            f"the server closes idle sessions after {idle_ms / 1000:g}s "
            f"({IDLE_TIMEOUT_NAME.get(tracker.engine.dialect.name, 'idle_session_timeout')}): recycle connections "
            "before that",
        )
    return {"observed": observed, "advice": advice}
