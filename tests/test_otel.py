"""With opentelemetry-api installed, the pool instruments are on the global meter provider too."""

from __future__ import annotations

import subprocess
import sys
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


class SpecMeter:
    """Stands in for a Meter: records what the semantic conventions' own create_* helpers ask for."""

    def __init__(self) -> None:
        self.spec: dict[str, tuple[str, str]] = {}

    def __getattr__(self, method: str) -> Callable[..., None]:
        kind = method.removeprefix("create_").removeprefix("observable_").replace("up_down_counter", "updowncounter")

        def create(name: str, *args: Any, unit: str = "", **kwargs: Any) -> None:
            self.spec[name] = (kind, unit)

        return create


def semantic_conventions() -> dict[str, tuple[str, str]]:
    """``db.client.connection.*`` instrument name -> (kind, unit), from opentelemetry-semantic-conventions."""
    import inspect

    from opentelemetry.semconv._incubating.metrics import db_metrics

    meter = SpecMeter()
    for name, create in vars(db_metrics).items():
        if name.startswith("create_db_client_connection_"):
            extra = len(inspect.signature(create).parameters) - 1  # the observable ones take callbacks
            create(meter, *([[]] * extra))
    return meter.spec


async def test_names_units_and_attributes_are_the_semantic_conventions(
    reader: InMemoryMetricReader, make_engine: Callable[..., AsyncEngine]
) -> None:
    from opentelemetry.sdk.metrics.export import Histogram, Sum
    from opentelemetry.semconv._incubating.attributes import db_attributes

    engine = make_engine()
    async with LifespanManager(DBPoolMiddleware(Starlette(), {"semconv_pool": engine})):
        data = reader.get_metrics_data()
    spec = semantic_conventions()
    assert len(spec) >= 8
    ours: dict[str, tuple[str, str]] = {}
    keys: set[str] = set()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            if scope.scope.name == "asgi_dbpool":
                for metric in scope.metrics:
                    points = metric.data
                    if isinstance(points, Histogram):
                        kind = "histogram"
                    else:
                        assert isinstance(points, Sum)
                        kind = "counter" if points.is_monotonic else "updowncounter"
                    ours[metric.name] = (kind, metric.unit or "")
                    keys.update(key for point in points.data_points for key in point.attributes)
    assert len(ours) == 8
    assert {name: spec.get(name) for name in ours} == ours
    assert keys == {db_attributes.DB_CLIENT_CONNECTION_POOL_NAME, db_attributes.DB_CLIENT_CONNECTION_STATE}


def test_no_histogram_is_recorded_without_an_sdk_provider() -> None:
    """With only the API's placeholder provider, checkouts record nothing into OpenTelemetry (a cost per checkout
    and nobody to read it); the instruments are still published for a provider configured later. A process of its
    own: this session configures an SDK provider."""
    code = (
        "from sqlalchemy.ext.asyncio import create_async_engine\n"
        "from starlette.applications import Starlette\n"
        "from asgi_dbpool import DBPoolMiddleware\n"
        "app = DBPoolMiddleware(Starlette(), create_async_engine('postgresql+asyncpg://u@localhost/db'))\n"
        "tracker = app.all_trackers()[0]\n"
        "print(app.opentelemetry, [h.otel for h in (tracker.acquisition.wait, tracker.use, tracker.create)])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "True [None, None, None]\n"


LATE_PROVIDER = """
import asyncio, contextlib, sys
from asgi_lifespan import LifespanManager
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from asgi_dbpool import DBPoolMiddleware

reader = InMemoryMetricReader()

@contextlib.asynccontextmanager
async def lifespan(app):
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))  # configured in the app's own startup
    yield

async def main():
    engine = create_async_engine(sys.argv[1])
    app = DBPoolMiddleware(Starlette(lifespan=lifespan), {"late_pool": engine})
    async with LifespanManager(app):
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        data = reader.get_metrics_data()
    counts = {
        m.name: p.count
        for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics for p in m.data.data_points
        if m.name.endswith("_time") and dict(p.attributes).get("db.client.connection.pool.name") == "late_pool"
    }
    print(sorted(counts.items()))

asyncio.run(main())
"""


def test_a_provider_configured_after_construction_gets_the_histograms(database_url: str) -> None:
    """Before: the provider was looked at once, at construction: an SDK configured later (here in the app's own
    startup) never received a histogram point."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", LATE_PROVIDER, database_url], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    assert out == "[('db.client.connection.use_time', 1), ('db.client.connection.wait_time', 1)]"
