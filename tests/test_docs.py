"""The front door cannot rot: the README's example runs, the configuration table lists exactly what
``PoolSettings`` reads, every benchmark figure quoted is in ``benchmarks/RESULTS.md``, and every relative link
points at a file (and a heading) that exists."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_dbpool.config.settings import ENV_READERS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.anyio
async def test_the_readme_fastapi_example_runs(
    database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (source,) = python_blocks(README)
    monkeypatch.setenv("ASYNC_DATABASE_URL", make_url(database_url).render_as_string(hide_password=False))
    for variable in ENV_READERS:
        if variable != "ASYNC_DATABASE_URL":
            monkeypatch.delenv(variable, raising=False)
    module = types.ModuleType("readme_example")
    module.__file__ = str(tmp_path / "readme_example.py")
    monkeypatch.setitem(sys.modules, "readme_example", module)
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    engine = module.engine
    async with engine.begin() as conn:  # "create the table however you manage your schema"
        await conn.run_sync(module.Base.metadata.drop_all)
        await conn.run_sync(module.Base.metadata.create_all)
    try:
        async with (
            LifespanManager(module.app) as manager,
            httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client,
        ):
            first = await client.post("/notes", params={"text": "hello"})
            second = await client.post("/notes", params={"text": "again"})
            pool = await client.get("/api/system/database/pool")
        assert (first.status_code, first.json()) == (201, {"id": 1})
        assert (second.status_code, second.json()) == (201, {"id": 2})
        assert pool.json()["pool_size"] == 10  # the development profile of the settings
    finally:
        cleanup = create_async_engine(database_url)  # the app's engine is closed for good after its shutdown
        async with cleanup.begin() as conn:
            await conn.run_sync(module.Base.metadata.drop_all)
        await cleanup.dispose()
