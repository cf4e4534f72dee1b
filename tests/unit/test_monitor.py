"""The pool monitor keeps running whatever a pool does."""

from __future__ import annotations

import asyncio
import logging

import pytest

from asgi_dbpool.observe.monitor import PoolMonitor

pytestmark = pytest.mark.anyio


async def test_monitor_survives_a_failing_pool(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        name = "broken"

        def snapshot(self) -> dict[str, int]:
            raise ValueError("cannot read")

    monitor = PoolMonitor([Broken()], interval=0.001)  # type: ignore[list-item]
    caplog.set_level(logging.INFO, logger="asgi_dbpool.monitor")
    task = asyncio.create_task(monitor.run())
    while monitor.ticks < 3:  # noqa: ASYNC110 - waiting for the monitor's own counter
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) >= 3
    assert errors[0].getMessage() == "could not read pool 'broken'"
