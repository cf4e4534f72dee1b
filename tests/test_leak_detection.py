"""Leak detection: a WARNING with the holder's stack, the return reported; no stacks without it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from asgi_dbpool import DBPoolMiddleware
from tests.helpers import PATH, samples, serving

pytestmark = pytest.mark.anyio


async def test_leak_detection_warns_with_the_stack_and_reports_the_return(
    driver_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    engine = driver_engine()
    app = DBPoolMiddleware(Starlette(), engine, leak_threshold=0.1)
    caplog.set_level(logging.INFO, logger="asgi_dbpool")

    async def slow_report() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            while not app.all_trackers()[0].leaks:  # noqa: ASYNC110 - held until the leak is reported
                await asyncio.sleep(0.02)

    async with serving(app) as client:
        await slow_report()
        metrics = samples((await client.get(PATH + "/metrics")).text)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("engine 'default': connection held for ")
    assert "(leak threshold 0.1s), checked out at:" in warnings[0]
    assert f"{__file__}:" in warnings[0]
    assert " in slow_report" in warnings[0]
    assert f" in {test_leak_detection_warns_with_the_stack_and_reports_the_return.__name__}" in warnings[0]
    returned = [r.getMessage() for r in caplog.records if "came back after" in r.getMessage()]
    assert len(returned) == 1
    assert returned[0].startswith(f"engine 'default': the connection checked out at {__file__}:")
    assert metrics[("asgi_dbpool_leaks_total", (("pool_name", "default"),))] == 1


async def test_no_stacks_are_captured_without_leak_detection(make_engine: Callable[..., AsyncEngine]) -> None:
    engine = make_engine()
    app = DBPoolMiddleware(Starlette(), engine)
    async with LifespanManager(app), engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        (checkout,) = app.all_trackers()[0].checkouts.values()
        assert checkout.stack is None
        assert checkout.site.startswith(f"{__file__}:")
