"""Nothing asgi_dbpool keeps holds an engine alive once the app and the engine are gone (issue 29): the engines are
collected, and neither a ``PoolCollector()`` nor the OpenTelemetry callbacks report them any longer."""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette

from asgi_dbpool import DBPoolMiddleware
from asgi_dbpool.observe import otel as _otel
from asgi_dbpool.prometheus import PoolCollector
from tests.helpers import LifespanDriver

pytestmark = pytest.mark.anyio

APPS = 5


def collector_pools(collector: PoolCollector) -> set[str]:
    """The pool names a collector yields samples for."""
    return {
        sample.labels["pool_name"]
        for metric in collector.collect()
        for sample in metric.samples
        if sample.labels.get("pool_name", "").startswith(f"lifetime{os.getpid()}_")
    }


class RecordingMeter:
    """Stands in for a Meter: keeps the observable instruments' callbacks, so the test calls them itself."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callable[[Any], list[Any]]]] = {}

    def __getattr__(self, method: str) -> Callable[..., None]:
        def create(name: str, *args: Any, callbacks: Any = (), **kwargs: Any) -> None:
            self.callbacks[name] = list(callbacks)

        return create


def otel_pools() -> set[str]:
    """The pool names the OpenTelemetry observable callbacks report (the callbacks ``_otel`` registers on its meter,
    called as the SDK calls them at each collection)."""
    meter, histograms = RecordingMeter(), dict(_otel._HISTOGRAMS)
    try:
        _otel._register(meter, lambda value, attributes: attributes)
    finally:  # _register also makes the histograms the hot path records into: keep the real ones
        _otel._HISTOGRAMS.clear()
        _otel._HISTOGRAMS.update(histograms)
    assert meter.callbacks, "the observable instruments' callbacks were not registered"
    names = set()
    for callbacks in meter.callbacks.values():
        for callback in callbacks:
            for attributes in callback(None):
                names.add(attributes[_otel.POOL])
    return {name for name in names if name.startswith(f"lifetime{os.getpid()}_")}


async def run_app(url: str, index: int) -> tuple[DBPoolMiddleware, AsyncEngine]:
    """An app with its own engine, its lifespan run (started, one query, stopped)."""
    name = f"lifetime{os.getpid()}_{index}"
    engine = create_async_engine(url, pool_size=2, connect_args={"server_settings": {"application_name": name}})
    app = DBPoolMiddleware(Starlette(), {name: engine})
    driver = LifespanDriver(app)
    assert (await driver.startup())["type"] == "lifespan.startup.complete"
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    assert (await driver.shutdown())["type"] == "lifespan.shutdown.complete"
    return app, engine


async def test_dropped_engines_are_collected_and_no_longer_reported(database_url: str) -> None:
    collector = PoolCollector()
    apps = [await run_app(database_url, i) for i in range(APPS)]
    names = {f"lifetime{os.getpid()}_{i}" for i in range(APPS)}
    refs = [(weakref.ref(engine), weakref.ref(engine.sync_engine)) for _, engine in apps]
    # While the apps are there, both report their engines.
    assert collector_pools(collector) == names
    assert otel_pools() == names
    del apps
    gc.collect()
    alive = [i for i, (async_ref, sync_ref) in enumerate(refs) if async_ref() is not None or sync_ref() is not None]
    assert alive == [], f"{len(alive)} of {APPS} engines survived gc.collect()"
    assert collector_pools(collector) == set()
    assert otel_pools() == set()


async def test_a_live_engine_keeps_its_tracker(database_url: str) -> None:
    """The tracker stays while its engine lives, even with no app left: a new app (or a collector) gets the same
    one, its figures included, and the engine works through it."""
    name = f"lifetime{os.getpid()}_live"
    engine = create_async_engine(database_url, connect_args={"server_settings": {"application_name": name}})
    try:
        app: DBPoolMiddleware | None = DBPoolMiddleware(Starlette(), {name: engine})
        assert app is not None
        tracker = app.all_trackers()[0]
        driver = LifespanDriver(app)
        await driver.startup()
        await driver.shutdown()
        checkouts = tracker.checkouts_total
        tracker_ref = weakref.ref(tracker)
        app = None
        del driver, tracker
        gc.collect()
        assert tracker_ref() is not None
        second = DBPoolMiddleware(Starlette(), {name: engine})
        again = second.all_trackers()[0]
        assert again is tracker_ref()
        assert again.engine is engine.sync_engine
        assert again.async_engine is engine
        assert again.checkouts_total == checkouts
        assert name in collector_pools(PoolCollector())
        driver = LifespanDriver(second)
        await driver.startup()
        before = again.checkouts_total
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        assert again.checkouts_total == before + 1
        await driver.shutdown()
    finally:
        await engine.dispose()


async def test_a_shared_tracker_is_listed_once(database_url: str) -> None:
    """An engine sharing a tracked pool (``execution_options``) shares its tracker: ``PoolCollector()`` reports it
    once, not once per engine."""
    from asgi_dbpool.pool.registry import all_trackers, tracker_for

    engine = create_async_engine(database_url)
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    tracker = tracker_for(engine, f"lifetime{os.getpid()}_shared")
    assert tracker_for(autocommit, "autocommit") is tracker
    assert all_trackers().count(tracker) == 1
    assert collector_pools(PoolCollector()) >= {f"lifetime{os.getpid()}_shared"}
    await engine.dispose()
