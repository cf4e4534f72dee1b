"""``python -m benchmarks [--smoke] [--only NAME ...] [--against REV]``: what the middleware costs, side by side, in
one run.

Every figure is a ratio to a baseline measured in the same run, in interleaved rounds (the order rotates
each round), reported as the median and the min-max over rounds. Results go to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from demo_app.embedded import EmbeddedPostgres

from .against import bench_against
from .bytecodes import bench_bytecodes
from .instructions import LAYOUTS, WORKLOADS, bench_instructions, discard, http_receive, http_scope
from .processes import free_port, wait_for_port, wrk
from .stats import Series, table

ROOT = Path(__file__).resolve().parent.parent
Rate = Callable[[], Awaitable[float]]
#: The sections of RESULTS.md, in their order (``--only`` picks some).
SECTIONS = ["instructions", "bytecodes", "inprocess", "inprocess-db", "checkout", "e2e", "shutdown", "overload"]


@contextlib.contextmanager
def database() -> Iterator[str]:
    given = os.environ.get("BENCH_DATABASE_URL") or os.environ.get("ASGI_DBPOOL_TEST_DATABASE_URL")
    if given:
        yield str(make_url(given).set(drivername="postgresql+asyncpg"))
        return
    with tempfile.TemporaryDirectory(prefix="bench-pg-") as pgdata, EmbeddedPostgres(Path(pgdata)) as server:
        yield server.url


async def interleave(variants: dict[str, Rate], rounds: int, baseline: str) -> Series:
    series = Series(baseline)
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            series.add(name, await variants[name]())
    return series


def http_rate(app: Any, state: dict[str, Any], scope: dict[str, Any], n: int) -> Rate:
    """Requests per second of ``n`` direct ASGI calls, each with a fresh copy of the lifespan state."""

    async def run() -> float:
        started = time.perf_counter()
        for _ in range(n):
            await app({**scope, "state": dict(state)}, http_receive, discard)
        return n / (time.perf_counter() - started)

    return run


# -- 1. per-request overhead, in process ------------------------------------------------------------
async def bench_inprocess(url: str, rounds: int, n: int) -> str:
    from asgi_lifespan import LifespanManager
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route, WebSocketRoute

    from asgi_dbpool import DBPoolMiddleware

    engine = create_async_engine(url)
    maker = async_sessionmaker(engine)

    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hi")

    async def ws(websocket: Any) -> None:
        await websocket.accept()
        await websocket.close()

    routes = [Route("/", hello), WebSocketRoute("/ws", ws)]

    class SessionMiddleware(BaseHTTPMiddleware):  # how fastapi-async-sqlalchemy provides sessions
        async def dispatch(self, request: Any, call_next: Any) -> Any:
            async with maker() as session:
                request.state.session = session
                return await call_next(request)

    class Forward:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await self.app(scope, receive, send)

    bare = Starlette(routes=routes)
    apps: dict[str, Any] = {
        "bare": bare,
        "DBPoolMiddleware": DBPoolMiddleware(Starlette(routes=routes), engine),
        "BaseHTTPMiddleware session": Starlette(routes=routes, middleware=[Middleware(SessionMiddleware)]),
        "forwarding wrapper": Forward(Starlette(routes=routes)),
    }
    ws_scope = {
        **http_scope("/ws"),
        "type": "websocket",
        "path": "/ws",
        "raw_path": b"/ws",
        "scheme": "ws",
        "subprotocols": [],
    }

    def ws_rate(app: Any, state: dict[str, Any]) -> Rate:
        async def run() -> float:
            started = time.perf_counter()
            for _ in range(n // 4):
                messages = iter([{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}])
                await app({**ws_scope, "state": dict(state)}, _receiver(messages), discard)
            return (n // 4) / (time.perf_counter() - started)

        return run

    async with contextlib.AsyncExitStack() as stack:
        states = {}
        for name, app in apps.items():
            manager = await stack.enter_async_context(LifespanManager(app))
            states[name] = manager._state
        http = await interleave(
            {k: http_rate(a, states[k], http_scope("/"), n) for k, a in apps.items()}, rounds, "bare"
        )
        wss = await interleave({k: ws_rate(a, states[k]) for k, a in apps.items()}, rounds, "bare")
    await engine.dispose()
    rows = [http.row(k, "req/s") for k in apps] + [
        [f"{k} (WebSocket connect/close)", *wss.row(k, "conn/s")[1:]] for k in apps
    ]
    return table(["variant", "median rate", "ratio to bare", "min-max"], rows)


# -- 1b. per-request overhead with a real query, in process (CPU cost, without the load generator's noise) --
async def bench_inprocess_db(url: str, rounds: int, n: int) -> str:
    from asgi_lifespan import LifespanManager
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from asgi_dbpool import DBPoolMiddleware

    def build(wrap: bool) -> Any:
        engine = create_async_engine(url, pool_size=2)
        maker = async_sessionmaker(engine)

        async def query(request: Any) -> PlainTextResponse:
            async with maker() as session:
                return PlainTextResponse(str((await session.execute(text("SELECT 1"))).scalar_one()))

        app = Starlette(routes=[Route("/q", query)])
        return (DBPoolMiddleware(app, engine) if wrap else app), engine

    scope = http_scope("/q")

    (bare, bare_engine), (wrapped, wrapped_engine) = build(False), build(True)
    async with LifespanManager(bare) as mb, LifespanManager(wrapped) as mw:
        series = await interleave(
            {"bare": http_rate(bare, mb._state, scope, n), "DBPoolMiddleware": http_rate(wrapped, mw._state, scope, n)},
            rounds,
            "bare",
        )
    await bare_engine.dispose()
    await wrapped_engine.dispose()
    rows = [series.row(k, "req/s") for k in ("bare", "DBPoolMiddleware")]
    return table(["variant", "median rate", "ratio to bare", "min-max"], rows)


# -- 3. pool instrumentation cost ----------------------------------------------------------------------
async def bench_checkout(url: str, rounds: int, n: int) -> str:
    from sqlalchemy.ext.asyncio import create_async_engine

    from asgi_dbpool.pool.registry import tracker_for

    plain = create_async_engine(url, pool_size=5)
    tracked = create_async_engine(url, pool_size=5)
    tracker_for(tracked, "tracked")
    stacks = create_async_engine(url, pool_size=5)
    tracker_for(stacks, "stacks").leak_threshold = 3600.0  # leak detection on: a stack is captured per checkout

    from sqlalchemy import text

    select_one = text("SELECT 1")

    def rate(engine: Any, query: bool) -> Rate:
        async def run() -> float:
            count = n if not query else n // 4
            started = time.perf_counter()
            for _ in range(count):
                async with engine.connect() as conn:
                    if query:
                        await conn.execute(select_one)
            return count / (time.perf_counter() - started)

        return run

    names = {"plain engine": plain, "tracked (asgi_dbpool)": tracked, "with leak detection (stacks)": stacks}
    bare = await interleave({k: rate(e, False) for k, e in names.items()}, rounds, "plain engine")
    queried = await interleave({k: rate(e, True) for k, e in names.items()}, rounds, "plain engine")
    for engine in names.values():
        await engine.dispose()
    rows = [bare.row(k, "checkouts/s") for k in names]
    rows += [[f"{k} + `SELECT 1`", *queried.row(k, "cycles/s")[1:]] for k in names]
    return table(["variant", "median rate", "ratio to plain", "min-max"], rows)


# -- 2 and 4: a real uvicorn process -----------------------------------------------------------------------
def _receiver(messages: Iterator[dict[str, Any]]) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def receive() -> dict[str, Any]:
        return next(messages)

    return receive


@contextlib.contextmanager
def uvicorn_process(
    url: str, variant: str, pool: str, pool_timeout: float = 30
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    env = {
        **os.environ,
        "BENCH_DATABASE_URL": url,
        "BENCH_POOL": pool,
        "BENCH_POOL_TIMEOUT": str(pool_timeout),
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", f"benchmarks.apps:{variant}", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, 30, proc)  # a loaded machine imports slowly
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def bench_end_to_end(url: str, rounds: int, seconds: float) -> str:
    """wrk against uvicorn, bare and wrapped in interleaved rounds (each round starts both anew)."""
    if shutil.which("wrk") is None:
        return "wrk is not installed (Debian: `apt-get install wrk`); skipped."
    series, p99 = Series("bare"), Series("bare")
    errors = {"bare": 0, "wrapped": 0}
    for r in range(rounds):
        for variant in ["bare", "wrapped"] if r % 2 == 0 else ["wrapped", "bare"]:
            with uvicorn_process(url, variant, "10,10") as (proc, port):
                wrk(port, "/q", 32, 1)  # warm-up: the pool's connections, the first requests' imports
                result = wrk(port, "/q", 32, seconds)
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
            series.add(variant, result["rate"])
            p99.add(variant, 1 / result["p99"])  # a rate, so the ratio reads like the others
            errors[variant] += int(result["errors"])
    rows = [
        [
            *series.row(k, "req/s"),
            f"{1 / statistics.median(p99.samples[k]):.1f} ms",
            f"{statistics.median(p99.ratios(k)):.3f}",
            str(errors[k]),
        ]
        for k in ("bare", "wrapped")
    ]
    return table(
        ["variant", "median rate", "ratio to bare", "min-max", "p99 latency", "p99 ratio (bare / variant)", "errors"],
        rows,
    )


def bench_shutdown(url: str, rounds: int) -> str:
    series = Series("bare (never disposes)")
    labels = {
        "bare": "bare (never disposes)",
        "report": "report (sleep 0.1 s + dispose)",
        "wrapped": "DBPoolMiddleware",
    }
    for r in range(rounds):
        order = list(labels)
        order = order[r % 3 :] + order[: r % 3]
        for variant in order:
            with uvicorn_process(url, variant, "30,40") as (proc, port):
                subprocess.run(  # warm the pool: 70 connections at once
                    [sys.executable, "-m", "benchmarks.loadgen", str(port), "/hold", "70", "0.3"],
                    cwd=ROOT,
                    capture_output=True,
                    check=True,
                )
                started = time.perf_counter()
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
                series.add(labels[variant], 1 / (time.perf_counter() - started))  # a rate, so ratios read alike
    rows = []
    for label in labels.values():
        ms = [1000 / v for v in series.samples[label]]
        base = [1000 / v for v in series.samples[series.baseline]]
        diffs = [a - b for a, b in zip(ms, base, strict=True)]
        rows.append(
            [
                label,
                f"{statistics.median(ms):.1f} ms",
                f"{statistics.median(diffs):+.1f} ms",
                f"{min(ms):.1f}-{max(ms):.1f} ms",
            ]
        )
    return table(["variant", "SIGTERM → exit (median)", "vs bare (median of per-round differences)", "min-max"], rows)


def bench_overload(url: str, rounds: int, seconds: float) -> str:
    """4x more clients than the pool serves (pool 4, no overflow, 2 s timeout, 50 ms holds): goodput and p99."""
    labels = {"wrapped": "wait for the pool (DB_POOL_TIMEOUT 2 s)", "failfast": "fail fast (DB_POOL_MAX_PENDING=4)"}
    goodput = Series(labels["wrapped"])
    p99 = Series(labels["wrapped"])
    errors: dict[str, int] = dict.fromkeys(labels.values(), 0)
    for r in range(rounds):
        for variant in ["wrapped", "failfast"] if r % 2 == 0 else ["failfast", "wrapped"]:
            with uvicorn_process(url, variant, "4,0", pool_timeout=2) as (proc, port):
                out = subprocess.run(
                    [sys.executable, "-m", "benchmarks.loadgen", str(port), "/hold", "16", str(seconds)],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                res = json.loads(out.stdout)
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
            label = labels[variant]
            goodput.add(label, res["requests"] / res["seconds"])
            lat = res["latencies_ms"]
            p99.add(label, lat[int(len(lat) * 0.99) - 1] if lat else float("nan"))
            errors[label] += res["errors"]
    rows = [
        [*goodput.row(k, "ok/s")[:2], f"{statistics.median(p99.samples[k]):.0f} ms", str(errors[k])]
        for k in labels.values()
    ]
    return table(["variant", "goodput (median)", "p99 of successful requests", "503s (all rounds)"], rows)


def environment() -> str:
    libs = ", ".join(f"{p} {version(p)}" for p in ("sqlalchemy", "asyncpg", "starlette", "uvicorn", "asgi-dbpool"))
    return f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}; {libs}"


def layout_count(text: str) -> int:
    """``--layouts``' value: a whole number of layouts, at least 1."""
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of memory layouts; give a whole number, 1 or more")
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="one tiny round of each (for the test suite)")
    parser.add_argument(
        "--only",
        nargs="*",
        choices=SECTIONS,
    )
    parser.add_argument(
        "--against",
        metavar="REV",
        help="also count the instructions of REV's package (a commit of this repository) beside this tree's, in the "
        "same layouts: whether a change made a ratio worse (with --only and no name, only that)",
    )
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=list(WORKLOADS),
        help="the instruction workloads to run (instructions and --against); all by default",
    )
    parser.add_argument(
        "--layouts",
        type=layout_count,
        default=LAYOUTS,
        metavar="N",
        help=f"memory layouts each instruction count is taken in (instructions and --against; default {LAYOUTS}): "
        "more layouts narrow the medians' spread, each costs one more run of every child",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args(argv)
    # --only with no name: no section (with --against, only its comparison).
    chosen = set(SECTIONS if args.only is None else args.only)
    rounds, n, seconds = (1, 200, 0.3) if args.smoke else (7, 20000, 3.0)
    sections = [
        f"# Benchmark results\n\nMachine: {environment()}.\n"
        f"Mode: {'smoke (not a measurement)' if args.smoke else f'{rounds} interleaved rounds'}.\n"
    ]
    print(sections[0], flush=True)

    def add(section: str) -> None:
        """Keep a section and print it at once: a later failure does not lose what was measured."""
        sections.append(section)
        print(section + "\n", flush=True)

    with database() as url:
        if "instructions" in chosen:
            add(
                "## Instructions per operation (valgrind's callgrind; repeatable, whatever else runs)\n\n"
                + bench_instructions(url, args.workloads, smoke=args.smoke, layouts=args.layouts)
            )
        if args.against:
            add(
                f"## Instructions per operation against {args.against} (both packages in the same layouts)\n\n"
                + bench_against(url, args.against, args.workloads, smoke=args.smoke, layouts=args.layouts)
            )
        if "bytecodes" in chosen:
            add(
                "## Bytecodes per operation (traced: exact, whatever the memory layout)\n\n"
                + bench_bytecodes(url, smoke=args.smoke)
            )
        if "inprocess" in chosen:
            add(
                "## Per-request overhead, in process (trivial Starlette endpoint)\n\n"
                + asyncio.run(bench_inprocess(url, rounds, n))
            )
        if "inprocess-db" in chosen:
            add(
                "## Per-request overhead, in process, one `SELECT 1` through a session per request\n\n"
                + asyncio.run(bench_inprocess_db(url, rounds, max(n // 10, 20)))
            )
        if "checkout" in chosen:
            add("## Pool checkout/checkin loop\n\n" + asyncio.run(bench_checkout(url, rounds, n)))
        if "e2e" in chosen:
            add(
                "## End to end: wrk against uvicorn, one `SELECT 1` per request, 32 keep-alive connections\n\n"
                + bench_end_to_end(url, rounds, seconds)
            )
        if "shutdown" in chosen:
            add(
                "## Shutdown latency: pool warmed to 30 + 40 connections, SIGTERM → exit\n\n"
                + bench_shutdown(url, max(rounds // 2, 1))
            )
        if "overload" in chosen:
            add(
                "## Overload: 16 clients on a pool of 4 (no overflow), 50 ms per request\n\n"
                + bench_overload(url, max(rounds // 2, 1), seconds)
            )
    text = "\n\n".join(sections) + "\n"
    if not args.smoke:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
