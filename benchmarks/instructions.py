"""Instructions per operation, counted by valgrind's callgrind: repeatable to a fraction of a percent on a busy
machine, where wall-clock ratios drift by several percent.

Each (workload, variant) runs in a child process under callgrind: set-up and warm-up, then ``SHORT``
operations, then ``LONG`` operations. Callgrind dumps its counters at each checkpoint between them (the child
calls ``getppid()``, which nothing else calls, and callgrind runs with ``--dump-before=getppid``), so one run
gives both counts; the cost of one operation is their difference divided by ``LONG - SHORT``: the loop's own
fixed costs cancel out, and interpreter start-up, imports, the lifespan and the exit are never counted.

``python -m benchmarks.instructions child WORKLOAD VARIANT`` is the child (it needs the database URL in
``BENCH_DATABASE_URL`` for the database workloads).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHORT, LONG = 100, 400
WARMUP = 50

#: workload -> (its variants, the first being the baseline; what one operation is)
WORKLOADS: dict[str, tuple[tuple[str, ...], str]] = {
    "trivial": (("bare", "forwarding wrapper", "DBPoolMiddleware"), "trivial Starlette endpoint (one GET)"),
    "checkout": (
        ("plain engine", "DBPoolMiddleware", "DBPoolMiddleware, leak detection on"),
        "`engine.connect()` + close, no query",
    ),
    "query": (("bare", "DBPoolMiddleware"), "request with one `SELECT 1` through an `AsyncSession`"),
}
#: The targets of the overhead issue: baseline instructions / variant instructions.
TARGETS = {
    ("trivial", "DBPoolMiddleware"): 0.97,
    ("checkout", "DBPoolMiddleware"): 0.95,
    ("checkout", "DBPoolMiddleware, leak detection on"): 0.90,
    ("query", "DBPoolMiddleware"): 0.985,
}


# -- the child: one workload, one variant, N operations ----------------------------------------------------
def http_scope(path: str) -> dict[str, Any]:
    """A GET scope as a server would pass it (the benchmarks call apps directly, without a server)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "scheme": "http",
    }


async def http_receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def discard(message: Any) -> None:
    return None


class Forward:
    """A middleware that only forwards: the least any ASGI wrapper costs."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


@contextlib.asynccontextmanager
async def _served(app: Any) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """The app after its lifespan startup, as one request: a GET / with a fresh copy of the lifespan state."""
    from asgi_lifespan import LifespanManager

    scope = http_scope("/")
    async with LifespanManager(app) as manager:
        state = manager._state

        async def request() -> None:
            await app({**scope, "state": dict(state)}, http_receive, discard)

        yield request


def _scrape(app: Any) -> None:
    """Read the pool histograms, as a metrics scrape does: the timings a window's checkouts recorded are folded
    into their buckets within that window, so each window pays for its own."""
    from asgi_dbpool import DBPoolMiddleware

    if isinstance(app, DBPoolMiddleware):
        for tracker in app.all_trackers():
            tracker.fold()


def _wrap(variant: str, app: Any, engine: Any) -> Any:
    from asgi_dbpool import DBPoolMiddleware

    if variant == "forwarding wrapper":
        return Forward(app)
    if variant == "DBPoolMiddleware":
        return DBPoolMiddleware(app, engine)
    if variant == "DBPoolMiddleware, leak detection on":
        return DBPoolMiddleware(app, engine, leak_threshold=3600.0)
    return app


async def _child(workload: str, variant: str, short: int, long: int) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    url = os.environ.get("BENCH_DATABASE_URL", "postgresql+asyncpg://unused@localhost/unused")
    engine = create_async_engine(url, pool_size=2)
    maker = async_sessionmaker(engine)
    select_one = text("SELECT 1")

    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hi")

    async def query(request: Any) -> PlainTextResponse:
        async with maker() as session:
            return PlainTextResponse(str((await session.execute(select_one)).scalar_one()))

    async def checkout() -> None:
        async with engine.connect():
            pass

    endpoint = hello if workload == "trivial" else query
    app = _wrap(variant, Starlette(routes=[Route("/", endpoint)]), engine)
    if workload == "trivial" and variant != "DBPoolMiddleware":
        engine = None  # the bare trivial app never touches a database
    # A server always has timers scheduled (uvicorn's main loop wakes every 0.1 s), which makes each turn of the
    # event loop compute its timeout; without one here, the middleware's monitor would be the only timer and
    # its variant alone would pay that per turn.
    server_tick = asyncio.create_task(asyncio.sleep(3600))
    async with _served(app) as request:
        operation = checkout if workload == "checkout" else request
        for n in (WARMUP, short, long):
            os.getppid()  # a checkpoint: callgrind dumps (and zeroes) its counters here
            for _ in range(n):
                await operation()
            _scrape(app)
        os.getppid()
    server_tick.cancel()
    if engine is not None:
        await engine.dispose()


# -- the parent: runs the children under callgrind and reports ----------------------------------------------
def per_operation(workload: str, variant: str, url: str, short: int = SHORT, long: int = LONG) -> float:
    """Instructions of one operation: (instructions of ``long`` operations - of ``short``) / (long - short)."""
    with tempfile.TemporaryDirectory(prefix="callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        env = {**os.environ, "BENCH_DATABASE_URL": url, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT)}
        command = [
            "valgrind",
            "--tool=callgrind",
            "--dump-before=getppid",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "benchmarks.instructions",
            "child",
            workload,
            variant,
            str(short),
            str(long),
        ]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"callgrind run {workload}/{variant} failed:\n{done.stderr[-3000:]}")
        # Dump k holds what ran between checkpoints k-1 and k: 1 set-up, 2 warm-up, 3 short, 4 long.
        totals = {}
        for dump in (3, 4):
            match = re.search(r"^summary:\s+(\d+)", Path(f"{out}.{dump}").read_text(), re.M)
            if match is None:
                raise RuntimeError(f"no summary line in callgrind's dump {dump} of {workload}/{variant}")
            totals[dump] = int(match.group(1))
        return (totals[4] - totals[3]) / (long - short)


def bench_instructions(url: str, workloads: list[str] | None = None, smoke: bool = False) -> str:
    """A table of instructions per operation and the ratios baseline / variant, beside the targets.

    ``smoke`` runs each child once natively with a handful of operations (the workloads work; nothing counted).
    """
    from .stats import table

    chosen = workloads or list(WORKLOADS)
    if smoke:
        for workload in chosen:
            for variant in WORKLOADS[workload][0]:
                env = {**os.environ, "BENCH_DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
                command = [sys.executable, "-m", "benchmarks.instructions", "child", workload, variant, "2", "4"]
                subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
        return "Smoke run: every workload ran natively; no instruction was counted."
    if shutil.which("valgrind") is None:
        return "valgrind is not installed (Debian: `apt-get install valgrind`); skipped."
    jobs = [(workload, variant) for workload in chosen for variant in WORKLOADS[workload][0]]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # counts do not depend on what else runs
        measured = dict(zip(jobs, pool.map(lambda job: per_operation(*job, url), jobs), strict=True))
    rows = []
    for workload in chosen:
        variants, what = WORKLOADS[workload]
        costs = {variant: measured[workload, variant] for variant in variants}
        base = costs[variants[0]]
        for variant in variants:
            target = TARGETS.get((workload, variant))
            ratio = base / costs[variant]
            verdict = "" if target is None else (f">= {target}: met" if ratio >= target else f">= {target}: missed")
            rows.append([what, variant, f"{costs[variant] / 1000:,.1f} k", f"{ratio:.3f}", verdict])
    return table(["workload", "variant", "instructions per operation", "baseline / variant", "target"], rows)


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[0] == "child":
        asyncio.run(_child(argv[1], argv[2], int(argv[3]), int(argv[4])))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
