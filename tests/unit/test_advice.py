"""Pool advice and the connection-budget check: SEED.md's tuning rules applied to given figures (no database)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asgi_dbpool.observe.advice import MIN_CHECKOUTS, Topology, advise, budget_lines
from asgi_dbpool.pool.registry import tracker_for
from asgi_dbpool.pool.tracker import PoolTracker

#: Nothing listens there: the tracker never connects, its figures are the test's.
URL = "postgresql+asyncpg://app:secret@127.0.0.1:1/app"
SERVER = {"max_connections": 100, "superuser_reserved_connections": 3, "reserved_connections": 0}


@pytest.fixture
def tracker_of() -> Iterator[Callable[..., PoolTracker]]:
    engines: list[AsyncEngine] = []

    def make(pool_size: int = 8, max_overflow: int = 8, **server: int) -> PoolTracker:
        engine = create_async_engine(URL, pool_size=pool_size, max_overflow=max_overflow)
        engines.append(engine)
        tracker = tracker_for(engine, "default")
        tracker.server = {**SERVER, **server} if server else {}
        return tracker

    yield make
    for engine in engines:
        engine.sync_engine.dispose()  # (never connected)


def settings_advised(tracker: PoolTracker, cores: int = 4) -> list[tuple[str, object, object]]:
    return [(item["setting"], item["current"], item["suggested"]) for item in advise(tracker, cores)["advice"]]


def test_a_pool_within_the_rules_of_thumb_gets_no_advice(tracker_of: Callable[..., PoolTracker]) -> None:
    result = advise(tracker_of(pool_size=8, max_overflow=8), cores=4)
    assert result == {
        "observed": {
            "pool_size": 8,
            "max_overflow": 8,
            "pool_recycle": -1,
            "cpu_count": 4,
            "checkouts": 0,
            "checked_out_high_water": 0,
            "overflow_high_water": 0,
            "overflow_checkouts": 0,
            "timeouts": 0,
            "use_time_p50_seconds": None,
            "wait_time_p99_seconds": None,
        },
        "advice": [],
    }


def test_pool_size_follows_two_to_four_times_the_cores(tracker_of: Callable[..., PoolTracker]) -> None:
    (item,) = advise(tracker_of(pool_size=5, max_overflow=10), cores=4)["advice"]
    assert item == {
        "setting": "DB_POOL_SIZE",
        "current": 5,
        "suggested": 8,
        "why": "rule of thumb: 2-4 x 4 CPU cores = 8-16 (more if the work is I/O bound)",
    }
    assert settings_advised(tracker_of(pool_size=40, max_overflow=40)) == [("DB_POOL_SIZE", 40, 16)]


def test_max_overflow_follows_one_to_two_times_the_pool_size(tracker_of: Callable[..., PoolTracker]) -> None:
    assert settings_advised(tracker_of(pool_size=8, max_overflow=2)) == [("DB_MAX_OVERFLOW", 2, 8)]
    assert settings_advised(tracker_of(pool_size=8, max_overflow=30)) == [("DB_MAX_OVERFLOW", 30, 16)]


def test_timeouts_grow_the_pool_by_the_overflow_seen(tracker_of: Callable[..., PoolTracker]) -> None:
    tracker = tracker_of()
    tracker.acquisition.timeouts, tracker.overflow_max = 3, 4
    (item,) = advise(tracker, cores=4)["advice"]
    assert item == {
        "setting": "DB_POOL_SIZE",
        "current": 8,
        "suggested": 12,
        "why": "3 checkout(s) timed out waiting for a connection: grow the pool (or find the slow queries holding "
        "connections)",
    }


def test_frequent_overflow_with_fast_holds_grows_the_pool(tracker_of: Callable[..., PoolTracker]) -> None:
    tracker = tracker_of()
    tracker.checkouts_total, tracker.overflow_checkouts, tracker.overflow_max = 100, 20, 3
    tracker.checked_out_max = 11
    for _ in range(100):
        tracker.use.observe(0.004)
    (item,) = advise(tracker, cores=4)["advice"]
    assert (item["setting"], item["current"], item["suggested"]) == ("DB_POOL_SIZE", 8, 11)
    assert item["why"].startswith("20% of checkouts ran in overflow while the median hold was ")
    assert item["why"].endswith(" ms or less: the pool is too small, not the queries too slow")
    for _ in range(300):  # control: slow holds are the queries' fault, not the pool's
        tracker.use.observe(2.0)
    assert settings_advised(tracker) == []


def test_a_pool_never_half_used_is_told_to_shrink(tracker_of: Callable[..., PoolTracker]) -> None:
    tracker = tracker_of(pool_size=16, max_overflow=16)
    tracker.checkouts_total, tracker.checked_out_max = MIN_CHECKOUTS, 3
    (item,) = advise(tracker, cores=4)["advice"]
    assert item == {
        "setting": "DB_POOL_SIZE",
        "current": 16,
        "suggested": 6,
        "why": "at most 3 of 16 connections were ever checked out (far below half): shrink the pool",
    }
    tracker.checkouts_total = MIN_CHECKOUTS - 1  # control: too few checkouts to judge
    assert settings_advised(tracker) == []


def test_recycle_comes_before_the_servers_idle_timeout(tracker_of: Callable[..., PoolTracker]) -> None:
    tracker = tracker_of(idle_session_timeout_ms=60_000)
    assert advise(tracker, cores=4)["advice"] == [
        {
            "setting": "DB_POOL_RECYCLE",
            "current": -1,
            "suggested": 48,
            "why": "the server closes idle sessions after 60s (idle_session_timeout): recycle connections before that",
        }
    ]


def test_the_budget_multiplies_workers_hosts_and_pools(tracker_of: Callable[..., PoolTracker]) -> None:
    tracker = tracker_of(pool_size=5, max_overflow=10, max_connections=100)
    assert budget_lines([tracker], Topology(workers=8, hosts=2), lambda _: "off") == [
        (
            logging.WARNING,
            "connection budget exceeded on postgresql+asyncpg://app:***@127.0.0.1:1/app: 8 worker(s) x 2 host(s) x "
            "(5 + 10) = 240 connections > max_connections 100 - reserved 3 = 97; lower DB_POOL_SIZE / "
            "DB_MAX_OVERFLOW, raise max_connections, or put PgBouncer in front",
        )
    ]
    assert budget_lines([tracker], Topology(workers=2), lambda _: "off") == []  # 30 <= 97: nothing to say


def test_through_pgbouncer_its_own_pool_is_what_must_fit(tracker_of: Callable[..., PoolTracker]) -> None:
    tracker = tracker_of(pool_size=5, max_overflow=10, max_connections=100)
    transaction = budget_lines([tracker], Topology(workers=8, pgbouncer_pool_size=40), lambda _: "transaction")
    assert transaction == [
        (
            logging.INFO,
            "connection budget through PgBouncer (transaction pooling) at postgresql+asyncpg://app:***@127.0.0.1:1/"
            "app: 8 worker(s) x (5 + 10) = 120 client connections share PgBouncer's pool of 40 server connections "
            "<= max_connections 100 - reserved 3 = 97",
        )
    ]
    session = budget_lines([tracker], Topology(workers=8, pgbouncer_pool_size=40), lambda _: "session")
    assert [level for level, _ in session] == [logging.WARNING]
    assert "in session pooling each client connection holds a server connection" in session[0][1]
