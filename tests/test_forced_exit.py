"""A forced exit under heavy writes (issue 29, items 6 and 8): real uvicorn and hypercorn processes serving a FastAPI
app with a ``BaseHTTPMiddleware`` (tests/apps/forced_exit_app.py), 12 writers of single-row and 4,000-row ORM inserts
on kept-alive connections, real signals.

Counted per run: PostgreSQL's unclean disconnects of the app's clients, uvicorn's ``Exception in ASGI application``
tracebacks and its ``ASGI callable returned without completing response`` lines, acknowledged writes (a 201 with an
id) missing from the table, and rows of writes that were never acknowledged. Each case also runs bare (the control).
``FORCED_EXIT_RUNS`` and ``FORCED_EXIT_CONTROL_RUNS`` set the runs per case (more by hand, for the figures of
docs/guarantees.md); ``FORCED_HYPERCORN_WORKERS`` adds options to hypercorn's command line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import fastapi
import httpx
import pytest

from tests.conftest import asyncpg_dsn, unclean_disconnects, wait_for_no_backends
from tests.servers import ROOT, Run

pytestmark = [pytest.mark.anyio, pytest.mark.servers]

WRITERS = 12
RUNS = int(os.environ.get("FORCED_EXIT_RUNS", "2"))
CONTROL_RUNS = int(os.environ.get("FORCED_EXIT_CONTROL_RUNS", "1"))
HYPERCORN_OPTIONS = os.environ.get("FORCED_HYPERCORN_WORKERS", "").split()
TRACEBACK = "Exception in ASGI application"
CUT_RESPONSE = "ASGI callable returned without completing response"
#: uvicorn's forced exit: Ctrl+C, then Ctrl+C again 0.2 s later.
FORCED = ((0.0, signal.SIGINT), (0.2, signal.SIGINT))
#: The middleware's budget on the forced path: min(shutdown_timeout=10, FORCE_EXIT_BUDGET=5).
BUDGET = 5.0
#: FastAPI 0.118+ runs a yield dependency's code after ``yield`` once the response is out (before: before it).
COMMITS_AFTER_RESPONSE = tuple(int(part) for part in fastapi.__version__.split(".")[:2]) >= (0, 118)


@dataclasses.dataclass
class Figures:
    unclean: int = 0
    tracebacks: int = 0
    cut_responses: int = 0  # uvicorn's one line for a response cut in the middle (no traceback)
    acknowledged: int = 0
    lost: int = 0  # acknowledged, not in the table
    lost_before_commit: int = 0  # of those: acknowledged, their commit (after the response) never began
    unacknowledged_saved: int = 0  # not answered 2xx, yet in the table
    saved_after_500: int = 0  # of those: answered 500 ("the changes may be saved")
    saved_cut: int = 0  # of those: a response cut in the middle (the client saw RemoteProtocolError)
    answers: dict[str, int] = dataclasses.field(default_factory=dict)
    exit_codes: list[int] = dataclasses.field(default_factory=list)
    noise: list[str] = dataclasses.field(default_factory=list)

    def add(self, other: Figures) -> None:
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if isinstance(mine, int):
                setattr(self, field.name, mine + theirs)
            elif isinstance(mine, list):
                mine.extend(theirs)
            else:
                for key, count in theirs.items():
                    mine[key] = mine.get(key, 0) + count


def start(run: Run, commit: str, server: str = "uvicorn") -> None:
    spec = f"tests.apps.forced_exit_app:{'app' if run.wrapped else 'bare_app'}"
    if server == "uvicorn":
        command = [sys.executable, "-m", "uvicorn", spec, "--port", str(run.port), "--lifespan", "on"]
    else:
        bind = f"127.0.0.1:{run.port}"
        command = [sys.executable, "-m", "hypercorn", spec, "--bind", bind, "--graceful-timeout", "10"]
        command += HYPERCORN_OPTIONS
    env = {
        **os.environ,
        "ASGI_DBPOOL_TEST_DATABASE_URL": run.database_url,
        "MATRIX_APP_NAME": run.name,
        "FORCED_COMMIT": commit,
        "FORCED_TRACE": "1",
        "PYTHONPATH": str(ROOT),
    }
    with run.log_path.open("wb") as out:
        run.proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


async def stored(run: Run) -> dict[str, int]:
    """Rows in the table per write (token) of this run."""
    conn = await asyncpg.connect(asyncpg_dsn(run.database_url))
    try:
        query = "SELECT token, count(*) AS n FROM forced_writes WHERE run = $1 GROUP BY token"
        return {row["token"]: row["n"] for row in await conn.fetch(query, run.name)}
    finally:
        await conn.close()


async def write_until_stopped(run: Run, writer: int, acknowledged: dict[str, int], answers: dict[str, Any]) -> None:
    """One writer on its own kept-alive connection: single rows and 4,000-row inserts in turn, until refused."""
    async with httpx.AsyncClient(base_url=run.base, timeout=30) as client:
        for k in range(10_000):
            token = f"{run.name}-{writer}-{k}"
            path = "/bulk" if (writer + k) % 2 else "/one"
            try:
                response = await client.post(path, params={"token": token})
            except httpx.HTTPError as exc:
                answers[token] = type(exc).__name__
                return
            answers[token] = response.status_code
            if response.status_code != 201:
                return
            acknowledged[token] = response.json()["rows"]


async def heavy_writes_run(
    run: Run, commit: str, signals: tuple[tuple[float, int], ...] = FORCED, server: str = "uvicorn"
) -> Figures:
    """12 writers until ``signals`` stop the server; what the run left, counted."""
    start(run, commit, server)
    await run.wait_up()
    acknowledged: dict[str, int] = {}
    answers: dict[str, Any] = {}
    writers = [asyncio.create_task(write_until_stopped(run, i, acknowledged, answers)) for i in range(WRITERS)]
    for _ in range(600):  # the pool warm: a dozen writes answered
        if len(acknowledged) >= WRITERS or any(w.done() for w in writers):
            break
        await asyncio.sleep(0.05)
    for delay, sig in signals:
        await asyncio.sleep(delay)
        run.signal(sig)
    code = await run.wait_exit()
    await asyncio.wait_for(asyncio.gather(*writers), 30)
    saved = await stored(run)
    assert await wait_for_no_backends(run.database_url, run.name) == 0
    output = run.output()
    began = set(re.findall(r"^commit start (\S+)$", output, re.M))  # commits after the response that began
    lost = [token for token, rows in acknowledged.items() if saved.get(token) != rows]
    unacknowledged = [token for token in saved if token not in acknowledged]
    figures = Figures(
        unclean=len(unclean_disconnects([run.name])),
        tracebacks=output.count(TRACEBACK),
        cut_responses=output.count(CUT_RESPONSE),
        acknowledged=len(acknowledged),
        lost=len(lost),
        lost_before_commit=len([token for token in lost if token not in began]) if commit == "late" else 0,
        unacknowledged_saved=len(unacknowledged),
        saved_after_500=len([token for token in unacknowledged if answers.get(token) == 500]),
        saved_cut=len([token for token in unacknowledged if answers.get(token) == "RemoteProtocolError"]),
        exit_codes=[code],
        noise=run.noise() if run.wrapped else [],
    )
    for answer in answers.values():
        figures.answers[str(answer)] = figures.answers.get(str(answer), 0) + 1
    return figures


def control_problems(figures: Figures) -> int:
    return figures.unclean + figures.tracebacks + figures.lost


async def runs(
    database_url: str,
    tmp_path: Path,
    commit: str,
    wrapped: bool,
    count: int,
    server: str = "uvicorn",
    until_problem: int = 0,
    **kw: Any,
) -> Figures:
    """``count`` runs; for a control, up to ``until_problem`` runs more while none showed a problem (a run in which
    every request finished before the second Ctrl+C shows nothing)."""
    total = Figures()
    done = 0
    while done < count or (done < count + until_problem and not control_problems(total)):
        log = tmp_path / f"{server}-{commit}-{'wrapped' if wrapped else 'bare'}-{done}.log"
        run = Run(server=server, wrapped=wrapped, database_url=database_url, log_path=log)
        total.add(await heavy_writes_run(run, commit, server=server, **kw))
        done += 1
    print(f"\n{server} {commit} {'wrapped' if wrapped else 'bare'}, {done} run(s): {total}")
    return total


@pytest.mark.parametrize("commit", ["endpoint", "late"])
async def test_forced_exit_under_heavy_writes(commit: str, database_url: str, tmp_path: Path) -> None:
    """Wrapped: no unclean disconnect, no traceback, no noise, every acknowledged write saved (with a commit after the
    response: every one whose commit began), rows without a 201 only after a 500 ("may be saved"). The control shows
    at least one of the problems."""
    wrapped = await runs(database_url, tmp_path, commit, True, RUNS)
    assert wrapped.acknowledged > 0
    assert wrapped.exit_codes == [0] * RUNS
    assert (wrapped.unclean, wrapped.tracebacks, wrapped.noise) == (0, 0, []), wrapped
    assert wrapped.lost == wrapped.lost_before_commit, wrapped  # 0 with commits in the endpoint
    # A row without a 201: answered 500 ("may be saved"), or its 201 cut in the middle after the commit.
    assert wrapped.unacknowledged_saved == wrapped.saved_after_500 + wrapped.saved_cut, wrapped
    assert wrapped.saved_cut <= wrapped.cut_responses, wrapped
    bare = await runs(database_url, tmp_path, commit, False, CONTROL_RUNS, until_problem=2)
    assert control_problems(bare) > 0, bare


async def active(run: Run, like: str) -> int:
    """The app's statements running now whose text is ``LIKE like``."""
    conn = await asyncpg.connect(asyncpg_dsn(run.database_url))
    try:
        value = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state = 'active' AND query LIKE $2",
            run.name,
            like,
        )
        return int(value)
    finally:
        await conn.close()


async def wait_active(run: Run, like: str) -> None:
    for _ in range(500):
        if await active(run, like):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {like!r} running:\n{run.output()}")


async def slow_commit_run(run: Run, commit_seconds: float) -> tuple[Any, dict[str, int], float]:
    """One request whose COMMIT, after its response, takes ``commit_seconds``: SIGINT while it runs its endpoint, SIGINT
    again while its COMMIT runs. Its answer, what the table holds, and the seconds from the second SIGINT to exit."""
    start(run, "late")
    await run.wait_up()
    token = f"{run.name}-slow"
    async with httpx.AsyncClient(base_url=run.base, timeout=30) as client:
        params = {"token": token, "before": 0.5, "commit_seconds": commit_seconds}
        request = asyncio.create_task(client.post("/slow", params=params))
        await wait_active(run, "SELECT pg_sleep(%")
        run.signal(signal.SIGINT)
        await wait_active(run, "COMMIT%")
        run.signal(signal.SIGINT)
        forced = asyncio.get_running_loop().time()
        await run.wait_exit()
        seconds = asyncio.get_running_loop().time() - forced
        try:
            answer: Any = (await request).status_code
        except httpx.HTTPError as exc:
            answer = type(exc).__name__
    return answer, await stored(run), seconds


@pytest.mark.parametrize("wrapped", [True, False], ids=["wrapped", "bare"])
async def test_a_commit_running_at_a_forced_exit_gets_the_rest_of_the_budget(
    wrapped: bool, database_url: str, tmp_path: Path
) -> None:
    """A COMMIT after the response (a yield dependency) that takes 1.5 s (a deferred trigger: PostgreSQL aborts such a
    COMMIT on a cancel request) is running when uvicorn force-exits. Wrapped it finishes, the write its client was
    told about is saved, the process exits within the budget; bare (and before: wrapped too), the driver's cancel
    aborts it. (Before FastAPI 0.118 the same COMMIT runs before the response: wrapped, the request is answered 500
    after it, "the changes may be saved", and they are.)"""
    run = Run(server="uvicorn", wrapped=wrapped, database_url=database_url, log_path=tmp_path / "slow.log")
    answer, saved, seconds = await slow_commit_run(run, commit_seconds=1.5)
    output = run.output()
    if COMMITS_AFTER_RESPONSE:
        assert answer == 201, output
    assert unclean_disconnects([run.name]) == []
    if wrapped:
        assert saved == {f"{run.name}-slow": 1}, output
        assert seconds < BUDGET + 1.0, output
        assert run.noise() == [], output
    else:
        assert saved == {}, output


@pytest.mark.parametrize(
    ("server", "options", "wrapped"),
    [("uvicorn", [], True), ("uvicorn", [], False), ("hypercorn", ["--workers", "0"], True)],
    ids=["uvicorn-wrapped", "uvicorn-bare", "hypercorn-w0-wrapped"],
)
async def test_a_request_after_the_stop_signal_is_refused(
    server: str, options: list[str], wrapped: bool, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a kept-alive connection, requests right after SIGTERM: wrapped, each is refused (503 + Connection: close) or
    finds the connection closed, and none is saved; bare, uvicorn still runs them until its next tick (0.1 s). (Bare
    hypercorn runs one or closes the connection first, by the race; under the ``hypercorn`` command, whose worker
    process hears no signal, the middleware cannot tell either: docs/guarantees.md.)"""
    monkeypatch.setattr(sys.modules[__name__], "HYPERCORN_OPTIONS", options)
    run = Run(server=server, wrapped=wrapped, database_url=database_url, log_path=tmp_path / "after.log")
    start(run, "endpoint", server)
    await run.wait_up()
    answers: list[Any] = []
    async with httpx.AsyncClient(base_url=run.base) as client:
        assert (await client.post("/one", params={"token": f"{run.name}-before"})).status_code == 201
        run.signal(signal.SIGTERM)
        for i in range(3):
            try:
                response = await client.post("/one", params={"token": f"{run.name}-after-{i}"})
                answers.append((response.status_code, response.headers.get("connection")))
            except httpx.HTTPError as exc:
                answers.append(type(exc).__name__)
            await asyncio.sleep(0.01)
    await run.wait_exit()
    saved = await stored(run)
    after = {token for token in saved if "-after-" in token}
    if wrapped:
        assert after == set(), (answers, run.output())
        assert all(a == (503, "close") or isinstance(a, str) for a in answers), answers
        assert run.noise() == [], run.output()
    else:
        assert after, answers  # served after the signal
