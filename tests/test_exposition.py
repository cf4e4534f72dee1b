"""The pool metrics as Prometheus reads them: text 0.0.4 exactly as prometheus_client writes it, OpenMetrics 1.0
when the scraper asks, both parsed back with their types by prometheus_client's parsers and accepted by
``promtool check metrics``; and the same families in a user's own registry through ``PoolCollector``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from asgi_dbpool import DBPoolMiddleware
from asgi_dbpool._version import __version__
from asgi_dbpool.observe.metrics import render
from asgi_dbpool.prometheus import PoolCollector
from tests.servers import Run, free_port

pytestmark = pytest.mark.anyio

METRICS = "/api/system/database/pool/metrics"
OPENMETRICS_ACCEPT = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
HAVE_PROMTOOL = os.path.exists(PROMTOOL)
KINDS = {
    "db_client_connection_timeouts": "counter",
    "asgi_dbpool_leaks": "counter",
    "db_client_connection_count": "gauge",
    "db_client_connection_pending_requests": "gauge",
    "db_client_connection_wait_time_seconds": "histogram",
}


async def scrape(app: DBPoolMiddleware, accept: str | None = None) -> httpx.Response:
    headers = {"accept": accept} if accept else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        return await client.get(METRICS, headers=headers)


async def warmed(make_engine: Callable[..., AsyncEngine]) -> tuple[AsyncEngine, DBPoolMiddleware]:
    engine = make_engine(pool_size=2, max_overflow=1)
    return engine, DBPoolMiddleware(Starlette(), engine)


async def test_text_is_what_prometheus_client_writes_and_parses_back_typed(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    engine, app = await warmed(make_engine)
    async with LifespanManager(app):
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        response = await scrape(app)
        registry = CollectorRegistry()
        registry.register(PoolCollector(app))
        theirs = generate_latest(registry).decode()
        ours = render(app.all_trackers(), __version__)
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert ours == theirs  # byte for byte, HELP/TYPE of a counter naming its _total sample included
    parsed = {family.name: family for family in parse_text(response.text)}
    assert {name: parsed[name].type for name in KINDS} == KINDS
    assert not [name for name, family in parsed.items() if family.type in ("unknown", "untyped")]
    timeouts = parsed["db_client_connection_timeouts"].samples
    assert [(s.name, s.labels, s.value) for s in timeouts] == [
        ("db_client_connection_timeouts_total", {"pool_name": "default"}, 0.0)
    ]
    wait_count = [s for s in parsed["db_client_connection_wait_time_seconds"].samples if s.name.endswith("_count")]
    assert wait_count[0].value >= 2  # the startup ping and the query above


async def test_openmetrics_when_the_scraper_asks(make_engine: Callable[..., AsyncEngine]) -> None:
    engine, app = await warmed(make_engine)
    async with LifespanManager(app):
        response = await scrape(app, OPENMETRICS_ACCEPT)
        registry = CollectorRegistry()
        registry.register(PoolCollector(engine))
        theirs = generate_openmetrics(registry).decode()
        ours = render(app.all_trackers(), __version__, openmetrics=True)
    assert response.headers["content-type"] == "application/openmetrics-text; version=1.0.0; charset=utf-8"
    assert response.text.endswith("# EOF\n")
    assert ours == theirs
    parsed = {family.name: family for family in parse_openmetrics(response.text)}
    assert {name: parsed[name].type for name in KINDS} == KINDS


#: promtool's lint (a naming style check, exit status 3; a parse error is 1) flags one name: the OpenTelemetry
#: semantic convention ``db.client.connection.count`` as Prometheus names it.
OTEL_NAME_LINT = 'db_client_connection_count non-histogram and non-summary metrics should not have "_count" suffix'


def promtool(body: str) -> tuple[int, list[str]]:
    checked = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, text=True, check=False)
    return checked.returncode, [line.strip() for line in (checked.stdout + checked.stderr).splitlines() if line.strip()]


async def test_promtool_accepts_the_text_exposition(make_engine: Callable[..., AsyncEngine]) -> None:
    """promtool reads the text format (OpenMetrics is checked by prometheus_client's parser above and by a real
    Prometheus server, which asks for it)."""
    if not HAVE_PROMTOOL:
        pytest.skip("promtool IS NOT INSTALLED here (.ci/run installs Debian's prometheus)")
    _, app = await warmed(make_engine)
    async with LifespanManager(app):
        body = (await scrape(app)).text
    assert await asyncio.to_thread(promtool, body) == (3, [OTEL_NAME_LINT])


async def test_the_collector_in_the_default_shape_of_a_users_registry(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    """``PoolCollector()`` with no source collects every managed engine of the process, named as on /metrics."""
    first, second = make_engine(), make_engine()
    app = DBPoolMiddleware(Starlette(), {"main": first, "reports": second})
    registry = CollectorRegistry()
    registry.register(PoolCollector())
    async with LifespanManager(app):
        parsed = {family.name: family for family in parse_text(generate_latest(registry).decode())}
    pools = {s.labels["pool_name"] for s in parsed["db_client_connection_max"].samples}
    assert {"main", "reports"} <= pools


PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
HAVE_PROMETHEUS = os.path.exists(PROMETHEUS)


@pytest.mark.servers
async def test_a_real_prometheus_scrapes_the_pool_series_with_their_types(database_url: str, tmp_path: Path) -> None:
    """A Prometheus server (Debian's) scrapes a wrapped app under uvicorn; its HTTP API gives back the series and
    the types it read (it asks for OpenMetrics first)."""
    if not HAVE_PROMETHEUS:
        pytest.skip("prometheus IS NOT INSTALLED here (.ci/run installs Debian's prometheus)")
    run = Run("uvicorn", True, database_url, tmp_path / "app.log")
    run.start(graceful=5, extra_env={"MATRIX_POLLER": "off"})
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: app\n"
        "    metrics_path: /api/system/database/pool/metrics\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{run.port}']}}]\n"
    )
    command = [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with (tmp_path / "prometheus.log").open("wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)  # noqa: ASYNC220 - a real server
    try:
        await run.wait_up()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as api:
            series: list[dict[str, object]] = []
            for _ in range(300):  # until a scrape has landed
                with contextlib.suppress(httpx.TransportError):
                    answer = await api.get("/api/v1/query", params={"query": "db_client_connection_max"})
                    series = answer.json()["data"]["result"]
                    if series:
                        break
                await asyncio.sleep(0.1)
            metadata = (await api.get("/api/v1/metadata")).json()["data"]
            target = (await api.get("/api/v1/targets")).json()["data"]["activeTargets"][0]
    finally:
        server.terminate()
        await asyncio.to_thread(server.wait, 10)
        run.signal(signal.SIGTERM)
        await run.wait_exit()
    assert target["health"] == "up", target
    assert [(s["metric"]["pool_name"], s["value"][1]) for s in series] == [("default", "30")]  # 20 + 10
    types = {name: entries[0]["type"] for name, entries in metadata.items()}
    assert {name: types.get(name) for name in KINDS} == KINDS
    assert not [name for name, kind in types.items() if kind == "unknown"]
