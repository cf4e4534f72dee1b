"""The app of the forced-exit reproduction (tests/test_forced_exit.py): FastAPI, a ``BaseHTTPMiddleware`` (Starlette's,
through ``@app.middleware("http")``) around endpoints that insert one row or 4,000 rows through the ORM.

Served by a real server process: ``uvicorn tests.apps.forced_exit_app:app`` (wrapped, the middleware added with
``app.add_middleware`` as the README shows) or ``...:bare_app`` (the control). Reads
``ASGI_DBPOOL_TEST_DATABASE_URL``, ``MATRIX_APP_NAME`` (the ``application_name`` of its connections and the ``run``
column of its rows) and ``FORCED_COMMIT``: ``endpoint`` (the endpoint commits before it answers) or ``late`` (a
``yield`` dependency commits after the response went out, as FastAPI 0.118+ runs its teardown).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, Response
from sqlalchemy import String, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asgi_dbpool import DBPoolMiddleware, PoolSettings

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s [%(process)d]: %(message)s")
logging.captureWarnings(True)

RUN = os.environ.get("MATRIX_APP_NAME", "forced")
LATE = os.environ.get("FORCED_COMMIT", "endpoint") == "late"
BULK_ROWS = 4000
URL = make_url(os.environ["ASGI_DBPOOL_TEST_DATABASE_URL"])
settings = PoolSettings(pool_size=20, max_overflow=10)
engine = settings.create_async_engine(URL, connect_args={"server_settings": {"application_name": RUN}})
maker = async_sessionmaker(engine, expire_on_commit=False)


class Base(DeclarativeBase): ...


class Row(Base):
    __tablename__ = "forced_writes"
    id: Mapped[int] = mapped_column(primary_key=True)
    run: Mapped[str] = mapped_column(String(64), index=True)
    token: Mapped[str] = mapped_column(String(128))
    n: Mapped[int]


class SlowCommit(Base):
    """A row whose COMMIT takes ``seconds``: a deferred constraint trigger sleeps then (a COMMIT PostgreSQL aborts on a
    cancel request, as it does any COMMIT running deferred checks or triggers)."""

    __tablename__ = "forced_slow_commits"
    id: Mapped[int] = mapped_column(primary_key=True)
    token: Mapped[str] = mapped_column(String(128))
    seconds: Mapped[float]


SLOW_COMMIT_DDL = [
    "CREATE OR REPLACE FUNCTION forced_slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN PERFORM pg_sleep(NEW.seconds); RETURN NULL; END $$",
    "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'forced_slow_commit') THEN "
    "CREATE CONSTRAINT TRIGGER forced_slow_commit AFTER INSERT ON forced_slow_commits DEFERRABLE INITIALLY DEFERRED "
    "FOR EACH ROW EXECUTE FUNCTION forced_slow_commit(); END IF; END $$",
]
TRACE = os.environ.get("FORCED_TRACE") == "1"


async def get_db(request: Request) -> AsyncIterator[AsyncSession]:
    async with maker() as session:
        yield session
        if LATE:
            if TRACE:
                print("commit start", request.query_params["token"], flush=True)
            await session.commit()  # after the response: FastAPI 0.118+ runs this once the response is out
            if TRACE:
                print("commit end", request.query_params["token"], flush=True)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(4243)"))  # servers of parallel tests race here
        await conn.run_sync(Base.metadata.create_all)
        for statement in SLOW_COMMIT_DDL:
            await conn.execute(text(statement))
    logging.getLogger("matrix").info("app started")
    yield


def make_app() -> FastAPI:
    api = FastAPI(lifespan=lifespan)

    @api.middleware("http")  # a BaseHTTPMiddleware, as many apps have one
    async def served_by(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers["x-served-by"] = str(os.getpid())
        return response

    @api.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @api.post("/one", status_code=201)
    async def one(token: str, db: AsyncSession = Depends(get_db)) -> dict[str, int]:  # noqa: B008
        row = Row(run=RUN, token=token, n=1)
        db.add(row)
        await db.flush()
        if not LATE:
            await db.commit()
        return {"id": row.id, "rows": 1}

    @api.post("/bulk", status_code=201)
    async def bulk(token: str, db: AsyncSession = Depends(get_db)) -> dict[str, int]:  # noqa: B008
        rows = [Row(run=RUN, token=token, n=i) for i in range(BULK_ROWS)]
        db.add_all(rows)
        await db.flush()
        if not LATE:
            await db.commit()
        return {"id": rows[0].id, "rows": BULK_ROWS}

    @api.post("/slow", status_code=201)
    async def slow(
        token: str,
        before: float = 0.0,
        commit_seconds: float = 0.0,
        db: AsyncSession = Depends(get_db),  # noqa: B008
    ) -> dict[str, int]:
        """Sleeps ``before`` in SQL, writes a row whose COMMIT takes ``commit_seconds``."""
        await db.execute(text("SELECT pg_sleep(:s)"), {"s": before})
        row = Row(run=RUN, token=token, n=1)
        db.add_all([row, SlowCommit(token=token, seconds=commit_seconds)])
        await db.flush()
        if not LATE:
            await db.commit()
        return {"id": row.id, "rows": 1}

    return api


bare_app = make_app()
app = make_app()
app.add_middleware(DBPoolMiddleware, engine=engine, shutdown_timeout=float(os.environ.get("FORCED_SHUTDOWN", "10")))
