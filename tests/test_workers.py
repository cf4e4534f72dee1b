"""Many workers: ``uvicorn --workers 4``, ``granian --workers 4`` and gunicorn with uvicorn's worker class;
SIGTERM to the master mid-traffic, and every worker shuts down clean (no noise, nothing lost, nothing left on
the database).

Under load (two of these runs side by side) this used to fail about one run in three: a worker's poller,
asleep when shutdown looked for connection holders, woke up, took a pooled connection and was pre-pinging it
when the worker exited, and PostgreSQL logged ``Connection reset by peer``. Tasks waiting for or pre-pinging
a connection now count as holders (see ``asgi_dbpool.pool.acquire``)."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import httpx
import pytest

from tests.servers import Run, drive

pytestmark = [pytest.mark.anyio, pytest.mark.servers]
NORMAL_EXIT = {"gunicorn": 0, "uvicorn-workers": 0, "granian-workers": 0}
SERVERS = ["gunicorn", "uvicorn-workers", "granian-workers"]


async def answering_pids(run: Run) -> tuple[set[int], set[int]]:
    """The ``pid`` of the stats JSON and of ``asgi_dbpool_info`` over fresh connections (spread over workers)."""
    stats, metrics = set(), set()
    for _ in range(100):
        async with httpx.AsyncClient(base_url=run.base) as client:  # a new connection each time
            stats.add((await client.get("/api/system/database/pool")).json()["pid"])
            text = (await client.get("/api/system/database/pool/metrics")).text
            metrics.update(int(pid) for pid in re.findall(r'^asgi_dbpool_info\{pid="(\d+)"', text, re.M))
        if len(stats) >= 2 and len(metrics) >= 2:
            break
    return stats, metrics


@pytest.mark.parametrize("server", SERVERS)
async def test_workers_shut_down_clean(server: str, database_url: str, tmp_path: Path) -> None:
    run = Run(server=server, wrapped=True, database_url=database_url, log_path=tmp_path / f"{server}.log")
    run.start(graceful=10)
    await run.wait_up()
    await run.wait_workers(4)
    # A scrape tells the workers apart: each answer carries the pid of the worker process that gave it.
    workers = {int(pid) for pid in re.findall(r"^INFO matrix \[(\d+)\]: app started$", run.output(), re.M)}
    stats, metrics = await answering_pids(run)
    assert len(workers) == 4
    assert len(stats) >= 2, (stats, workers)
    assert stats <= workers, (stats, workers)
    assert len(metrics) >= 2, (metrics, workers)
    assert metrics <= workers, (metrics, workers)
    await drive(run, [(0.0, signal.SIGTERM)], write_seconds=0.3)
    output = run.output()
    assert run.exit_code == NORMAL_EXIT[server], output
    assert run.noise() == [], output
    assert set(run.writes.values()) == {200}, (run.writes, output)
    stored = await run.stored()
    assert {t: stored.get(t) for t in run.ids} == run.ids
    assert set(stored) == set(run.ids)
    assert run.unclean() == []
    assert await run.backends_left() == 0
    # every worker ran the whole shutdown: four "disposed" lines, one per process
    assert output.count("shutdown finished in") == 4, output


@pytest.mark.parametrize("server", SERVERS)
async def test_workers_control_without_the_middleware_shows_a_problem(
    server: str, database_url: str, tmp_path: Path
) -> None:
    """The same run without the middleware must show at least one problem, or the test above proves nothing."""
    run = Run(server=server, wrapped=False, database_url=database_url, log_path=tmp_path / f"{server}.log")
    run.start(graceful=10)
    await run.wait_up()
    await run.wait_workers(4)
    await drive(run, [(0.0, signal.SIGTERM)], write_seconds=0.3)
    stored = await run.stored()
    problems = {
        "noise": run.noise(),
        "unclean disconnects": run.unclean(),
        "backends left": await run.backends_left(),
        "cut or failed requests": {t: s for t, s in run.writes.items() if s != 200},
        "lost writes": {t: i for t, i in run.ids.items() if stored.get(t) != i},
    }
    assert any(problems.values()), problems
