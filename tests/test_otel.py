"""With opentelemetry-api installed, the pool instruments are on the global meter provider too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from asgi_lifespan import LifespanManager
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from asgi_dbpool import DBPoolMiddleware

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def reader() -> InMemoryMetricReader:
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return reader


def points(reader: InMemoryMetricReader, pool: str) -> dict[tuple[str, str], Any]:
    data = reader.get_metrics_data()
    out: dict[tuple[str, str], Any] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            if scope.scope.name != "asgi_dbpool":
                continue
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attrs = dict(point.attributes)
                    if attrs.get("db.client.connection.pool.name") == pool:
                        out[(metric.name, str(attrs.get("db.client.connection.state", "")))] = point
    return out


async def test_instruments_on_the_global_meter_provider(
    reader: InMemoryMetricReader, make_engine: Callable[..., AsyncEngine]
) -> None:
    engine = make_engine(pool_size=3, max_overflow=2)
    app = DBPoolMiddleware(Starlette(), {"otel_pool": engine})
    assert app.opentelemetry is True
    async with LifespanManager(app), engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        seen = points(reader, "otel_pool")
    assert seen[("db.client.connection.count", "used")].value == 1
    assert seen[("db.client.connection.count", "idle")].value == 0
    assert seen[("db.client.connection.max", "")].value == 5
    assert seen[("db.client.connection.idle.max", "")].value == 3
    assert seen[("db.client.connection.pending_requests", "")].value == 0
    assert seen[("db.client.connection.timeouts", "")].value == 0
    # the startup ping and the read of the server settings were waited for and used; the third is still out
    assert seen[("db.client.connection.wait_time", "")].count == 3
    assert seen[("db.client.connection.use_time", "")].count == 2
    assert seen[("db.client.connection.create_time", "")].count == 1
