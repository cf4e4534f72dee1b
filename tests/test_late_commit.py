"""FastAPI (0.118 and later) runs the code after ``yield`` in a dependency once the response is out, so the
common ``yield session; await session.commit()`` answers 201 before the COMMIT: one WARNING per route and a
counter say so; a commit in the endpoint, or ``Depends(..., scope="function")``, is silent."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import fastapi
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import BackgroundTasks, Depends, FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from asgi_dbpool import DBPoolMiddleware

pytestmark = pytest.mark.anyio

VERSION = tuple(int(part) for part in fastapi.__version__.split(".")[:2])
COMMITS_AFTER_RESPONSE = VERSION >= (0, 118)  # FastAPI's change of when dependency teardown runs
HAS_SCOPE = "scope" in inspect.signature(fastapi.Depends).parameters


def late_commits(metrics: str) -> dict[str, float]:
    for family in text_string_to_metric_families(metrics):
        if family.name == "asgi_dbpool_commits_after_response":
            return {s.labels["route"]: s.value for s in family.samples}
    raise AssertionError("no asgi_dbpool_commits_after_response family")


async def test_a_commit_after_the_response_is_reported_once_per_route(
    make_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine()
    maker = async_sessionmaker(engine)

    async def get_db() -> AsyncIterator[AsyncSession]:
        async with maker() as session:
            yield session
            await session.commit()  # after the response, on FastAPI 0.118+

    api = FastAPI()

    @api.post("/items/{item_id}", status_code=201)
    async def create(item_id: int, db: AsyncSession = Depends(get_db)) -> dict[str, int]:  # noqa: B008
        await db.execute(text("CREATE TEMP TABLE IF NOT EXISTS items (id int)"))
        await db.execute(text("INSERT INTO items VALUES (:id)"), {"id": item_id})  # committed after yield
        return {"id": item_id}

    @api.post("/inline", status_code=201)
    async def inline(db: AsyncSession = Depends(get_db)) -> dict[str, bool]:  # noqa: B008
        await db.commit()  # committed before answering: nothing to report (the later commit has nothing to do)
        return {"ok": True}

    extra: dict[str, Any] = {"scope": "function"} if HAS_SCOPE else {}

    @api.post("/scoped", status_code=201)
    async def scoped(db: AsyncSession = Depends(get_db, **extra)) -> dict[str, bool]:  # noqa: B008
        await db.execute(text("SELECT 1"))  # a transaction that the teardown commits
        return {"ok": True}

    app = DBPoolMiddleware(api, engine)
    caplog.set_level(logging.WARNING, logger="asgi_dbpool")
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        before = late_commits((await client.get("/api/system/database/pool/metrics")).text)
        statuses = [(await client.post(path)).status_code for path in ["/items/1", "/items/2", "/scoped", "/inline"]]
        after = late_commits((await client.get("/api/system/database/pool/metrics")).text)
    assert statuses == [201, 201, 201, 201]
    warnings = [r.getMessage() for r in caplog.records if getattr(r, "step", None) == "late_commit"]
    grew = {route: after[route] - before.get(route, 0) for route in after}
    route = "POST /items/{item_id}"
    if COMMITS_AFTER_RESPONSE:
        assert warnings == [
            f"{route}: an ORM commit started after the response was sent: the client was told it succeeded before "
            "the COMMIT, which can still fail or be cut by a shutdown (FastAPI runs the code after `yield` in a "
            "dependency once the response is out). Commit in the endpoint, or declare the dependency with "
            'Depends(..., scope="function")'
        ] or (before.get(route) and warnings == [])  # once per route and process
        assert {r: n for r, n in grew.items() if n} == ({route: 2} if HAS_SCOPE else {route: 2, "POST /scoped": 1})
    else:  # the dependency's teardown ran before the response: nothing to report
        assert (warnings, {r: n for r, n in grew.items() if n}) == ([], {})


async def test_late_commits_are_per_app_by_template_and_not_for_background_tasks(
    make_engine: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    """Before: one process-global table (every app's /metrics showed every app's routes), raw paths as labels for
    raw ASGI apps, and a commit in a ``BackgroundTasks`` task (after the response by design) counted and warned."""
    engine = make_engine()
    maker = async_sessionmaker(engine)

    async def get_db() -> AsyncIterator[AsyncSession]:
        async with maker() as session:
            yield session
            await session.commit()  # after the response, on FastAPI 0.118+

    async def in_background() -> None:
        async with maker() as session:
            await session.execute(text("SELECT 1"))
            await session.commit()

    api = FastAPI()

    @api.post("/late/{n}", status_code=201)
    async def late(n: int, db: AsyncSession = Depends(get_db)) -> dict[str, int]:  # noqa: B008
        await db.execute(text("SELECT CAST(:n AS int)"), {"n": n})
        return {"n": n}

    @api.post("/background", status_code=202)
    async def background(tasks: BackgroundTasks) -> dict[str, bool]:
        tasks.add_task(in_background)
        return {"queued": True}

    async def raw(scope: dict[str, Any], receive: Any, send: Any) -> None:  # no route template: "other"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        async with maker() as session:
            await session.execute(text("SELECT 1"))
            await session.commit()

    first, second = DBPoolMiddleware(api, engine), DBPoolMiddleware(raw, make_engine())
    caplog.set_level(logging.WARNING, logger="asgi_dbpool")
    async with (
        LifespanManager(first),
        LifespanManager(second),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=first), base_url="http://t") as one,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=second), base_url="http://t") as two,
    ):
        statuses = [(await one.post(path)).status_code for path in ["/late/1", "/late/2", "/background"]]
        statuses += [(await two.get(f"/raw/{n}")).status_code for n in range(3)]
        first_metrics = late_commits((await one.get("/api/system/database/pool/metrics")).text)
        second_metrics = late_commits((await two.get("/api/system/database/pool/metrics")).text)
    assert statuses == [201, 201, 202, 200, 200, 200]
    if COMMITS_AFTER_RESPONSE:
        assert first_metrics == {"POST /late/{n}": 2}
    else:
        assert first_metrics == {}
    assert second_metrics == {"other": 3}
    warned = sorted(r.figures["route"] for r in caplog.records if getattr(r, "step", None) == "late_commit")  # type: ignore[attr-defined]
    assert warned == (["POST /late/{n}", "other"] if COMMITS_AFTER_RESPONSE else ["other"])
