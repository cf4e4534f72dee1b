"""The tracked pool: a fresh instance of a subclass that keeps the pool's logger; a pool that already holds
connections is left as it is and followed through pool events."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from asgi_dbpool import DBPoolMiddleware


@pytest.mark.anyio
async def test_the_tracked_pool_is_a_fresh_instance_that_keeps_its_logger(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    engine = make_engine()
    untracked = engine.sync_engine.pool
    base_name = type(untracked).__name__
    logger_name = untracked.logger.name if isinstance(untracked.logger, logging.Logger) else None
    app = DBPoolMiddleware(lambda scope, receive, send: None, engine)  # type: ignore[arg-type, return-value]
    pool = engine.sync_engine.pool
    # No engine or dialect event listener: SQLAlchemy skips its listener lookups at every statement.
    assert (engine.sync_engine._has_events, engine.sync_engine.dialect._has_events) == (False, False)
    assert pool is not untracked  # a __class__ assignment on the live pool would turn its attributes into a dict
    assert type(pool).__name__ == f"Tracked{base_name}"
    assert type(untracked).__name__ == base_name  # the live pool was only read: its class is its own
    if logger_name is not None:
        assert pool.logger.name == logger_name  # SQLAlchemy's pool log lines keep their logger
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    assert pool.checkedout() == 0
    assert app.all_trackers()[0].create.count == 1  # the pool timed the connection it opened
    await engine.dispose()
    assert type(engine.sync_engine.pool) is type(pool)  # recreate() keeps the tracking


@pytest.mark.anyio
async def test_a_pool_that_already_connected_keeps_its_connections_and_times_new_ones(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    engine = make_engine(pool_size=1)
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    pool = engine.sync_engine.pool
    app = DBPoolMiddleware(lambda scope, receive, send: None, engine)  # type: ignore[arg-type, return-value]
    tracker = app.all_trackers()[0]
    assert engine.sync_engine.pool is pool  # its idle connection stays, and so does its class: pool events follow it
    assert not type(pool).__name__.startswith("Tracked")
    async with engine.connect() as first, engine.connect() as second:  # the idle one, then an overflow one
        await first.execute(text("SELECT 1"))
        await second.execute(text("SELECT 1"))
        assert len(tracker.checkouts) == 2
    assert tracker.create.count == 1  # only the overflow connection was opened after tracking began
    await engine.dispose()


@pytest.mark.anyio
async def test_a_static_pool_keeps_its_connection_and_is_followed_through_events(tmp_path: Path) -> None:
    """A StaticPool that already holds its one connection (with a temporary table in it: replacing the pool would
    lose it) is left as it is, class and connection; its checkouts, checkins and the shutdown's disposal are seen."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", poolclass=StaticPool)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TEMPORARY TABLE notes (body TEXT)"))
        await conn.execute(text("INSERT INTO notes VALUES ('kept')"))
    pool = engine.sync_engine.pool
    events: list[str] = []
    seen: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        async with engine.connect() as conn:
            seen.append(len(tracker.checkouts))
            body = (await conn.execute(text("SELECT body FROM notes"))).scalar_one()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body.encode()})

    wrapped = DBPoolMiddleware(app, engine)
    tracker = wrapped.all_trackers()[0]
    event.listen(engine.sync_engine, "engine_disposed", lambda _: events.append("disposed"))
    assert engine.sync_engine.pool is pool  # the live pool is left as it is
    assert type(pool) is StaticPool
    async with LifespanManager(wrapped):
        before = (tracker.checkouts_total, tracker.use.count)  # (the startup's own)
        transport = httpx.ASGITransport(wrapped)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            responses = [await client.get("/") for _ in range(3)]
        assert [(r.status_code, r.text) for r in responses] == [(200, "kept")] * 3
        assert seen == [1, 1, 1]  # each request's checkout, seen while held
        assert len(tracker.checkouts) == 0
        assert (tracker.checkouts_total - before[0], tracker.use.count - before[1]) == (3, 3)
    assert events == ["disposed"]


@pytest.mark.anyio
async def test_an_engine_sharing_a_tracked_pool_shares_its_tracker(make_engine: Callable[..., AsyncEngine]) -> None:
    """``engine.execution_options(...)`` shares the engine's pool: its checkouts are the pool's, seen by one tracker
    (the pool reports to the tracker it was given; a second tracker would see nothing)."""
    from asgi_dbpool.pool.registry import tracker_for

    engine = make_engine()
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    tracker = tracker_for(engine, "default")
    assert tracker_for(autocommit, "autocommit") is tracker
    async with autocommit.connect() as conn:
        await conn.execute(text("SELECT 1"))
        assert len(tracker.checkouts) == 1
    assert tracker.checkouts == {}
    assert tracker.checkouts_total == 1
    await engine.dispose()  # the test's engines must leave no backend (one pool: both are closed)
