"""Instructions per operation, counted by valgrind's callgrind: independent of what else runs on a busy machine,
where wall-clock ratios drift by several percent (but moved by the memory layout, see :data:`LAYOUTS`).

Each (workload, variant) runs in a child process under callgrind: set-up and warm-up, then ``SHORT``
operations, then ``LONG`` operations. Callgrind dumps its counters at each checkpoint between them (the child
calls ``getppid()``, which nothing else calls, and callgrind runs with ``--dump-before=getppid``), so one run
gives both counts; the cost of one operation is their difference divided by ``LONG - SHORT``: the loop's own
fixed costs cancel out, and interpreter start-up, imports, the lifespan and the exit are never counted.
The served workload is a uvicorn process instead, driven by wrk between two checkpoints (see
:func:`served_per_request`). The floor variants run only the parts of the middleware that carry a feature.

Each child runs in :data:`LAYOUTS` memory layouts (another hash seed and another length of the environment
variable ``BENCH_LAYOUT`` for each); ratios are taken within a layout.

``python -m benchmarks.instructions child WORKLOAD VARIANT SHORT LONG`` is the child (it needs the database URL
in ``BENCH_DATABASE_URL`` for the database workloads); ``serve VARIANT PORT`` is the served one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# The floors run the middleware's own parts (imported here: an import in a function is paid at every call). An
# earlier revision's package (``--against``, see benchmarks.against) may have other modules: its floors are not run.
try:
    from asgi_dbpool.asgi.request import InFlight, set_request
    from asgi_dbpool.pool.checkout import checkout_frames
except ImportError:
    pass

from .processes import free_port, wait_for_port, wrk

ROOT = Path(__file__).resolve().parent.parent
SHORT, LONG = 100, 400
WARMUP = 50

#: workload -> (its variants, the first being the baseline; what one operation is)
WORKLOADS: dict[str, tuple[tuple[str, ...], str]] = {
    "trivial": (
        ("bare", "forwarding wrapper", "floor: request record + send hook", "DBPoolMiddleware"),
        "trivial Starlette endpoint (one GET)",
    ),
    "checkout": (
        (
            "plain engine",
            "floor: checkout site",
            "DBPoolMiddleware",
            "floor: checkout stack",
            "DBPoolMiddleware, leak detection on",
        ),
        "`engine.connect()` + close, no query",
    ),
    "query": (
        ("bare", "floor: record + send hook + site", "DBPoolMiddleware"),
        "request with one `SELECT 1` through an `AsyncSession`",
    ),
    "served": (
        ("bare", "floor: record + send hook + site", "DBPoolMiddleware"),
        "the same request served by uvicorn to wrk (one connection), the server process",
    ),
}
#: What each floor variant keeps: the parts of the middleware that carry a feature, run alone (see ``_wrap``).
FLOORS = {
    "floor: request record + send hook": "the request's record in a context variable (a checkout in a task the "
    "request spawned finds it) and the send hook (the 503 in place of the app's 500, the end of the response "
    "for the commit-after-response warning)",
    "floor: checkout site": "the walk that takes the checkout's `file:line` (leak reports, the shutdown's "
    "reclaim), in the pool's `_do_get`",
    "floor: checkout stack": "the same walk going on to take the stack (up to 12 user frames, for the leak "
    "report) as with leak detection on",
    "floor: record + send hook + site": "both floors above",
}
#: The floor each target is judged by: the workload's first floor unless named here.
FLOOR_OF = {("checkout", "DBPoolMiddleware, leak detection on"): "floor: checkout stack"}
#: What the middleware does beyond each floor, and the feature each part carries.
_REQUEST_BOOKKEEPING = (
    'per request, the stats path test, the middleware in `scope["state"]`, the shutdown\'s refusal, the count '
    "of requests in flight (what the drain waits for) and the end of the request"
)
_CHECKOUT_BOOKKEEPING = (
    "per checkout, the holder's note and its checkin (leak reports, the shutdown's reclaim), the wait and use "
    "timings (the histograms), the current task and the set of waiting tasks (the shutdown cancels holders and "
    "waiters), the counters (the stats) and the gate of the shutdown's refusal and `max_pending`"
)
BOOKKEEPING = {
    "floor: request record + send hook": _REQUEST_BOOKKEEPING,
    "floor: checkout site": _CHECKOUT_BOOKKEEPING,
    "floor: checkout stack": _CHECKOUT_BOOKKEEPING,
    "floor: record + send hook + site": f"{_REQUEST_BOOKKEEPING}; {_CHECKOUT_BOOKKEEPING}",
}
#: The targets of the overhead issue: baseline instructions / variant instructions.
TARGETS = {
    ("trivial", "DBPoolMiddleware"): 0.97,
    ("checkout", "DBPoolMiddleware"): 0.95,
    ("checkout", "DBPoolMiddleware, leak detection on"): 0.90,
    ("query", "DBPoolMiddleware"): 0.985,
    ("served", "DBPoolMiddleware"): 0.98,  # the end-to-end target (wrk), counted in instructions
}
#: Each (workload, variant) runs once per memory layout, this many layouts; the table gives the medians and the
#: ranges. Under valgrind a child's counts are fixed by its environment and its hash seed: two runs with the same
#: ones agree to within a few hundred instructions, while another environment or seed moves where objects land
#: and how dictionaries, sets and CPython's type-attribute cache probe (the database workloads by up to 1 %, the
#: trivial one by 0.2 %). So layout ``n`` is hash seed ``n`` and an environment variable ``n`` times
#: :data:`LAYOUT_STEP` characters long, the same for every variant of a workload, and the ratio is taken within
#: each layout (the variants' own names, in ``argv``, still differ).
LAYOUTS = 5
LAYOUT_STEP = 997
#: Layout ``n`` also hands out ``n`` times this many type version tags first (see ``benchmarks._shift_type_versions``).
TYPE_SHIFT_STEP = 331
#: The served workload: how long wrk warms the server up, then drives it between the two checkpoints (under
#: callgrind a server answers some tens of requests a second: enough for a few hundred requests).
SERVED_WARMUP, SERVED_SECONDS = 5, 12


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


class RecordOnly(Forward):
    """The request floor: a wrapper doing only what the middleware's features need per request, with the
    middleware's own record: it is made, set in the context variable, and routes ``send``."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        request = InFlight.start(scope, send)
        set_request(request)
        try:
            await self.app(scope, receive, request.send)
        finally:
            request.done = True


def site_only(engine: Any, stack: bool = False) -> None:
    """The checkout floor: ``engine``'s pool with only the walk of the checkout site (and with ``stack``, of the
    stack, as with leak detection on) added to its ``_do_get`` (a fresh pool of a subclass, as the middleware
    installs its own)."""
    pool = engine.sync_engine.pool
    base = type(pool)
    base_get = base._do_get

    def _do_get(pool: Any) -> Any:
        record = base_get(pool)
        checkout_frames(stack)
        return record

    pool.__class__ = type(f"SiteOnly{base.__name__}", (base,), {"_do_get": _do_get})
    engine.sync_engine.pool = pool.recreate()


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
    if variant.startswith("floor:"):
        if "site" in variant or "stack" in variant:
            site_only(engine, stack="stack" in variant)
        return RecordOnly(app) if "record" in variant else app
    if variant == "DBPoolMiddleware":
        return DBPoolMiddleware(app, engine)
    if variant == "DBPoolMiddleware, leak detection on":
        return DBPoolMiddleware(app, engine, leak_threshold=3600.0)
    if variant in ("bare", "plain engine"):
        return app
    raise ValueError(f"unknown variant {variant!r}: one of {sorted({v for vs, _ in WORKLOADS.values() for v in vs})}")


@contextlib.asynccontextmanager
async def workload_operation(workload: str, variant: str) -> AsyncIterator[tuple[Callable[[], Awaitable[None]], Any]]:
    """One operation of ``workload`` for ``variant``, and the app, after the lifespan startup (the database URL is
    ``BENCH_DATABASE_URL``)."""
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
    # A server always has timers scheduled (uvicorn's main loop wakes every 0.1 s), which makes each turn of the
    # event loop compute its timeout; without one here, the middleware's monitor would be the only timer and
    # its variant alone would pay that per turn.
    server_tick = asyncio.create_task(asyncio.sleep(3600))
    try:
        async with _served(app) as request:
            yield (checkout if workload == "checkout" else request), app
    finally:
        server_tick.cancel()
        await engine.dispose()  # the bare trivial app never connected: nothing to close


async def _child(workload: str, variant: str, short: int, long: int) -> None:
    async with workload_operation(workload, variant) as (operation, app):
        for n in (WARMUP, short, long):
            os.getppid()  # a checkpoint: callgrind dumps (and zeroes) its counters here
            for _ in range(n):
                await operation()
            _scrape(app)
        os.getppid()


def child_env(url: str, layout: int, package: str | None = None) -> dict[str, str]:
    """A child's environment: the database, and the hash seed and padding that make memory layout ``layout``
    (see :data:`LAYOUTS`); with ``package``, the folder holding the ``asgi_dbpool`` it imports instead of this
    tree's (``--against``)."""
    env = {
        **os.environ,
        "BENCH_DATABASE_URL": url,
        "PYTHONHASHSEED": str(layout),
        "PYTHONPATH": str(ROOT),
        "BENCH_LAYOUT": "x" * (layout * LAYOUT_STEP),
        "BENCH_TYPE_SHIFT": str(layout * TYPE_SHIFT_STEP),
    }
    if package is not None:
        env["BENCH_PACKAGE"] = package
    return env


# -- the served workload: a real uvicorn process under callgrind, driven by wrk ----------------------------------
class Marked:
    """The served app behind a checkpoint: ``GET /__mark`` makes callgrind dump its counters and answers how
    many requests the app was given since the previous mark (both variants pay for this wrapper alike)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.served = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if scope["path"] == "/__mark":
                os.getppid()  # a checkpoint
                body, self.served = str(self.served).encode(), 0
                headers = [(b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            self.served += 1
        await self.app(scope, receive, send)


def _serve(variant: str, port: int) -> None:
    """The served child: ``benchmarks.apps``' routes and engine, wrapped for ``variant`` as the in-process
    workloads are, under uvicorn, behind :class:`Marked`."""
    import uvicorn
    from starlette.applications import Starlette

    from . import apps

    app = _wrap(variant, Starlette(routes=apps.routes), apps.engine)
    uvicorn.run(Marked(app), host="127.0.0.1", port=port, log_level="warning")


def _get(port: int, path: str, timeout: float) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply.decode().partition("\r\n\r\n")[2]


def served_per_request(
    variant: str, url: str, layout: int = 0, valgrind: bool = True, package: str | None = None
) -> float:
    """Instructions the uvicorn process spends per request: wrk drives it between two checkpoints, and the
    counts of that window are divided by the requests the app was given in it (``package``: see child_env)."""
    with tempfile.TemporaryDirectory(prefix="callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        port = free_port()
        env = {**child_env(url, layout, package), "BENCH_POOL": "10,10"}
        child = [sys.executable, "-m", "benchmarks.instructions", "serve", variant, str(port)]
        if valgrind:
            child = [
                "valgrind",
                "--tool=callgrind",
                "--dump-before=getppid",
                f"--callgrind-out-file={out}",
                *child,
            ]
        server = subprocess.Popen(child, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_port(port, 120, server)  # interpreter start-up under valgrind is slow
            # Under callgrind a request takes tens of milliseconds: wrk's timeout is raised to match.
            wrk(port, "/q", 1, SERVED_WARMUP if valgrind else 1, timeout=10)  # the pool, the first imports
            _get(port, "/__mark", 60)
            wrk(port, "/q", 1, SERVED_SECONDS if valgrind else 1, timeout=10)
            served = int(_get(port, "/__mark", 60))
        finally:
            server.terminate()
            _, stderr = server.communicate(timeout=120)
        if not valgrind:
            return 0.0
        match = re.search(r"^summary:\s+(\d+)", Path(f"{out}.2").read_text(), re.M)
        if match is None or served == 0:
            raise RuntimeError(f"served {variant}: no count ({served} requests):\n{stderr.decode()[-3000:]}")
        return int(match.group(1)) / served


# -- the parent: runs the children under callgrind and reports ----------------------------------------------
def per_operation(
    workload: str,
    variant: str,
    url: str,
    layout: int = 0,
    short: int = SHORT,
    long: int = LONG,
    package: str | None = None,
) -> float:
    """Instructions of one operation in memory layout ``layout``: (instructions of ``long`` operations - of
    ``short``) / (long - short) (``package``: see :func:`child_env`)."""
    if workload == "served":
        return served_per_request(variant, url, layout, package=package)
    with tempfile.TemporaryDirectory(prefix="callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        env = child_env(url, layout, package)
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


def smoke_run(workload: str, variant: str, url: str, package: str | None = None) -> None:
    """One child of (``workload``, ``variant``), natively, with a handful of operations (``--smoke``: it works;
    nothing counted; ``package``: see :func:`child_env`)."""
    if workload == "served":
        served_per_request(variant, url, valgrind=False, package=package)
        return
    command = [sys.executable, "-m", "benchmarks.instructions", "child", workload, variant, "2", "4"]
    subprocess.run(command, cwd=ROOT, env=child_env(url, 0, package), check=True, capture_output=True)


def bench_instructions(
    url: str, workloads: list[str] | None = None, smoke: bool = False, layouts: int = LAYOUTS
) -> str:
    """A table of instructions per operation and the ratios baseline / variant, beside the targets, in ``layouts``
    memory layouts (0 to ``layouts - 1``).

    ``smoke`` runs each child once natively with a handful of operations (the workloads work; nothing counted).
    """
    chosen = workloads or list(WORKLOADS)
    if smoke:
        for workload in chosen:
            for variant in WORKLOADS[workload][0]:
                smoke_run(workload, variant, url)
        return "Smoke run: every workload ran natively; no instruction was counted."
    if shutil.which("valgrind") is None:
        return "valgrind is not installed (Debian: `apt-get install valgrind`); skipped."
    jobs = [
        (workload, variant, layout)
        for layout in range(layouts)
        for workload in chosen
        for variant in WORKLOADS[workload][0]
    ]

    def run(job: tuple[str, str, int]) -> float:
        workload, variant, layout = job
        return per_operation(workload, variant, url, layout)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # counts do not depend on what else runs
        counts = dict(zip(jobs, pool.map(run, jobs), strict=True))
    return report(chosen, counts)


def report(chosen: list[str], counts: dict[tuple[str, str, int], float]) -> str:
    """The table and the verdicts from ``counts``: instructions per operation by (workload, variant, layout)."""
    from .stats import table

    layouts = sorted({layout for _, _, layout in counts})
    rows = []
    verdicts = []
    for workload in chosen:
        variants, what = WORKLOADS[workload]
        base = variants[0]
        by_layout = {variant: [counts[workload, variant, layout] for layout in layouts] for variant in variants}
        for variant in variants:
            ratios = _ratios(by_layout[base], by_layout[variant])
            ratio = statistics.median(ratios)
            target = TARGETS.get((workload, variant))
            verdict = ""
            if target is not None:
                verdict = f">= {target}: met" if ratio >= target else f">= {target}: missed"
                if ratio < target:
                    floor = FLOOR_OF.get((workload, variant)) or next(v for v in variants if v.startswith("floor:"))
                    verdicts.append(_missed(what, variant, target, floor, by_layout[base], by_layout))
            low, high = min(by_layout[variant]), max(by_layout[variant])
            rows.append(
                [
                    what,
                    variant,
                    f"{statistics.median(by_layout[variant]) / 1000:,.1f} k",
                    f"{low / 1000:,.1f}-{high / 1000:,.1f} k",
                    f"{ratio:.3f}",
                    f"{min(ratios):.3f}-{max(ratios):.3f}",
                    verdict,
                ]
            )
    header = [
        "workload",
        "variant",
        f"instructions per operation (median of {len(layouts)} layouts)",
        "range",
        "baseline / variant (median of the layouts' ratios)",
        "range of the ratios",
        "target",
    ]
    text = table(header, rows)
    if verdicts:
        text += "\n\nEach missed target beside its floor (the parts that carry a feature, run alone):\n\n" + "\n".join(
            verdicts
        )
    return text


def _ratios(base: list[float], variant: list[float]) -> list[float]:
    """baseline / variant within each layout."""
    return [b / v for b, v in zip(base, variant, strict=True)]


def _missed(
    what: str, variant: str, target: float, floor: str, base: list[float], by_layout: dict[str, list[float]]
) -> str:
    """One line on a missed target: whether ``floor`` alone meets it, and how many instructions the target leaves
    the middleware's own bookkeeping beside how many it takes (``base`` and ``by_layout``: counts per layout;
    every figure is the median of the layouts' own)."""
    ratio = statistics.median(_ratios(base, by_layout[variant]))
    floor_ratio = statistics.median(_ratios(base, by_layout[floor]))
    own = statistics.median(v - f for v, f in zip(by_layout[variant], by_layout[floor], strict=True)) / 1000
    head = f"- {what}, {variant}: {ratio:.3f} (target {target}). The floor, {FLOORS[floor]}, is "
    if floor_ratio < target:
        verdict = f"{floor_ratio:.3f} by itself: the target cannot be met while these features stay"
    else:
        room = statistics.median(b / target - f for b, f in zip(base, by_layout[floor], strict=True)) / 1000
        verdict = (
            f"{floor_ratio:.3f} by itself: the target leaves {room:,.1f} k instructions for the rest of the middleware"
        )
    return (
        f"{head}{verdict}. The rest, {own:,.1f} k, is the bookkeeping of the other features: {BOOKKEEPING[floor]} "
        "(docs/benchmarks.md measures each part)."
    )


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[0] == "child":
        asyncio.run(_child(argv[1], argv[2], int(argv[3]), int(argv[4])))
        return 0
    if len(argv) == 3 and argv[0] == "serve":
        _serve(argv[1], int(argv[2]))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
