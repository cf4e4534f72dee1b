"""The shutdown matrix: real uvicorn, hypercorn and granian processes, real signals, real PostgreSQL.

For each server and signal case the wrapped app must shut down with no noise, nothing lost, a clean
database side and a normal exit; the same case without the middleware (the control) must show at least
one of those problems, or the matrix would prove nothing.

granian has no graceful timeout for requests: its ``--workers-kill-timeout`` SIGKILLs a worker that has not
stopped in time, before the lifespan shutdown ever runs. That case is not a clean one for any in-process
library; ``test_granian_kill_timeout_skips_the_shutdown`` pins down what happens (the README says it too).
"""

from __future__ import annotations

import ast
import re
import signal
from pathlib import Path

import pytest

from tests.conftest import MARIADB_DRIVERS, url_for
from tests.mariadb import MariaDB
from tests.servers import Run, drive

pytestmark = [pytest.mark.anyio, pytest.mark.servers]

# case -> (signals as (delay before, signal), seconds each write sleeps in SQL, server graceful timeout)
CASES = {
    "sigterm": ([(0.0, signal.SIGTERM)], 0.3, 10.0),
    "sigint": ([(0.0, signal.SIGINT)], 0.3, 10.0),
    "double-sigint": ([(0.0, signal.SIGINT), (0.2, signal.SIGINT)], 0.3, 10.0),
    "graceful-timeout": ([(0.0, signal.SIGTERM)], 3.0, 1.0),
}
#: What each server's process exits with after a clean shutdown on that signal (see the README).
NORMAL_EXIT = {
    ("uvicorn", "sigterm"): -signal.SIGTERM,  # uvicorn re-raises the caught signal after a clean shutdown
    ("uvicorn", "graceful-timeout"): -signal.SIGTERM,
    ("uvicorn", "sigint"): 0,  # ...and its CLI turns the re-raised SIGINT into exit 0
    ("uvicorn", "double-sigint"): 0,
}
#: The cases in which the server itself cancels requests (so 503 answers are the expected outcome).
CUTS_REQUESTS = {("uvicorn", "double-sigint"), ("uvicorn", "graceful-timeout"), ("hypercorn", "graceful-timeout")}
SERVERS = ["uvicorn", "hypercorn", "granian"]
#: (server, case) pairs no in-process code can make clean: the server kills the process without a shutdown.
KILLS_THE_WORKER = {("granian", "graceful-timeout")}
CLEAN_CASES = [(server, case) for server in SERVERS for case in CASES if (server, case) not in KILLS_THE_WORKER]


async def run_case(
    server: str, case: str, wrapped: bool, database_url: str, tmp_path: Path, mariadb: MariaDB | None = None
) -> Run:
    signals, write_seconds, graceful = CASES[case]
    log_path = tmp_path / f"{server}-{case}.log"
    run = Run(server=server, wrapped=wrapped, database_url=database_url, log_path=log_path, mariadb=mariadb)
    run.start(graceful)
    await run.wait_up()
    await drive(run, signals, write_seconds)
    return run


@pytest.mark.parametrize(("server", "case"), CLEAN_CASES)
async def test_wrapped_app_shuts_down_clean(server: str, case: str, database_url: str, tmp_path: Path) -> None:
    run = await run_case(server, case, True, database_url, tmp_path)
    await check_clean(run, server, case)


async def check_clean(run: Run, server: str, case: str) -> None:
    output = run.output()
    # normal exit
    assert run.exit_code == NORMAL_EXIT.get((server, case), 0), output
    # no noise
    assert run.noise() == [], output
    # nothing lost: every request accepted before the signal completed, or got a clean 503
    # (500 = cut off after its COMMIT was sent: the changes may be saved, so no Retry-After invites a retry)
    allowed = {200, 503, 500} if (server, case) in CUTS_REQUESTS else {200}
    assert set(run.writes.values()) <= allowed, (run.writes, output)
    assert run.slow in allowed - {500}, output  # a read commits nothing
    stored = await run.stored()
    assert {t: stored.get(t) for t in run.ids} == run.ids  # every 200 is in the table
    refused = {t for t, status in run.writes.items() if status == 503}
    assert not refused & set(stored), (stored, run.writes)  # a 503 saved nothing: safe to retry
    assert set(stored) <= set(run.ids) | {t for t, s in run.writes.items() if s == 500}  # nothing else saved
    # clean on the database side
    unclean = run.unclean()
    if run.mariadb is not None:
        # MariaDB's one exception: the poller (a task the app never stops) cancelled by the shutdown in the middle
        # of its SELECT SLEEP: the server still sends the result, the closed socket answers RST: one aborted client.
        # Cancelled between its query and its checkin, it costs nothing: at most one aborted session per task cut.
        cut = sum(int(n) for n in re.findall(r"cancelling (\d+) task\(s\) still holding connections", output))
        counters = [line for line in unclean if line.startswith("Aborted_")]
        aborted = int(counters[0].removeprefix("Aborted_clients +")) if counters else 0
        assert counters in ([], [f"Aborted_clients +{aborted}"]), counters
        assert aborted <= cut, (unclean, output)
        unclean = [line for line in unclean if not line.startswith("Aborted_")]
        assert len(unclean) == aborted
        assert all("Got an error reading communication packets" in line for line in unclean), unclean
        unclean = []
    assert unclean == []
    assert await run.backends_left() == 0
    # the middleware said what it did
    assert "1 engine(s) disposed; leaks: 2 closed (see warnings above)" in output
    assert output.count("closing a leaked connection checked out at") == 2
    # which two: the sessions /leak left open, their tasks finished. Where the server cancels every task at once
    # (uvicorn's forced exit), the poller's connection if the exit caught it closing its session: SQLAlchemy's close
    # task, cancelled before it ran, never checks it in (5 runs in 150 under load); cut off, not leaked
    leak, poller = site_of("leak"), site_of("poller")
    assert RECLAIMED.findall(output) == [(leak, "finished")] * 2, output
    cut = CUT_OFF.findall(output)
    assert cut == ([(poller, "cancelled")] * len(cut) if case == "double-sigint" else []), output
    assert len(cut) <= 1
    assert ("leaks: 2 closed (see warnings above); cut off by the forced exit: 1 closed" in output) == bool(cut), output


#: The shutdown's report of each leak it closed: the line of the test app that checked it out, how its task ended.
RECLAIMED = re.compile(
    r"closing a leaked connection checked out at \S+/server_app\.py:(\d+) .* by task '[^']+' \((\w+)\)"
)
#: Its report of a connection the forced exit cut off (its holder cancelled before it gave the connection back).
CUT_OFF = re.compile(
    r"closing a connection the forced exit cut off before its task gave it back: checked out at "
    r"\S+/server_app\.py:(\d+) .* by task '[^']+' \((\w+)\)"
)


def site_of(function: str) -> str:
    """The line where ``function`` of the test app checks its connection out (its one ``execute``)."""
    tree = ast.parse((Path(__file__).parent / "apps" / "server_app.py").read_text())
    [node] = [n for n in tree.body if isinstance(n, ast.AsyncFunctionDef) and n.name == function]
    calls = [n for n in ast.walk(node) if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "execute"]
    return str(min(call.lineno for call in calls))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("server", SERVERS)
async def test_control_without_the_middleware_shows_a_problem(
    server: str, case: str, database_url: str, tmp_path: Path
) -> None:
    run = await run_case(server, case, False, database_url, tmp_path)
    stored = await run.stored()
    problems = {
        "noise": run.noise(),
        "unclean disconnects": run.unclean(),
        "backends left": await run.backends_left(),
        "cut or failed requests": {t: s for t, s in run.writes.items() if s not in (200, 503)},
        "lost writes": {t: i for t, i in run.ids.items() if stored.get(t) != i},
    }
    assert any(problems.values()), problems


async def test_granian_kill_timeout_skips_the_shutdown(database_url: str, tmp_path: Path) -> None:
    """granian waits for in-flight requests before lifespan.shutdown, with no timeout of its own; past
    ``--workers-kill-timeout`` it SIGKILLs the worker. No shutdown step runs, so the guarantees cannot hold:
    requests are cut (never acknowledged, so no acknowledged write is lost) and PostgreSQL sees vanished clients.
    Set the kill timeout above the longest request plus ``shutdown_timeout``, or leave it off (granian's default).
    """
    run = await run_case("granian", "graceful-timeout", True, database_url, tmp_path)
    output = run.output()
    assert "[WARNING] Killing worker-1 after it refused to gracefully stop" in output
    assert "shutdown flag set" not in output  # the lifespan shutdown never started
    assert run.exit_code == 0
    assert run.ids == {}  # no write was acknowledged...
    assert set(run.writes.values()) == {"RemoteProtocolError"}  # ...each connection was dropped
    assert not set(await run.stored())  # and none was committed
    assert run.unclean() != []


# -- the other drivers: SIGTERM mid-traffic under uvicorn and hypercorn ---------------------------------------------


async def run_driver_case(
    driver: str, server: str, wrapped: bool, request: pytest.FixtureRequest, tmp_path: Path
) -> Run:
    url = url_for(driver, request, tmp_path)
    mariadb = request.getfixturevalue("mariadb") if driver in MARIADB_DRIVERS else None
    return await run_case(server, "sigterm", wrapped, url, tmp_path, mariadb)


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
@pytest.mark.parametrize("driver", ["psycopg", "aiomysql", "asyncmy", "aiosqlite"])
async def test_every_driver_shuts_down_clean_on_sigterm(
    driver: str, server: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    run = await run_driver_case(driver, server, True, request, tmp_path)
    await check_clean(run, server, "sigterm")


@pytest.mark.parametrize("driver", ["psycopg", "aiomysql", "asyncmy"])
async def test_control_per_driver_without_the_middleware(
    driver: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The process exits with its connections open: PostgreSQL logs the clients that vanished, MariaDB counts
    every session aborted (its error log too)."""
    run = await run_driver_case(driver, "uvicorn", False, request, tmp_path)
    if driver == "psycopg":
        # A backend logs its client's vanishing when it notices, then exits: read the log once they are all gone
        # (read at once, a loaded machine's log could still be without them: seen once in CI's lowest column).
        assert await run.backends_left() == 0
    unclean = run.unclean()
    if driver == "psycopg":
        # unexpected EOF / connection to client lost / could not receive data (what unclean() looks for)
        assert unclean, run.output()
    else:
        assert unclean[0].startswith("Aborted_clients +"), unclean
        aborted = int(unclean[0].removeprefix("Aborted_clients +"))
        assert aborted >= 3, unclean  # the two leaked sessions, the poller's, the idle pooled ones
        # At least one error-log line per aborted client (a cut handshake can log one more: 11 for 10 once on 3.13)
        assert len([line for line in unclean if "Aborted connection" in line]) >= aborted


async def test_sqlite_is_quiet_without_the_middleware_too(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """SQLite has no server to notice a vanished client, and this run leaves no hot journal and no noise without
    the middleware either: the wrapped SQLite runs are regression checks, not proof of a fix."""
    run = await run_driver_case("aiosqlite", "uvicorn", False, request, tmp_path)
    assert run.noise() == []
    assert run.unclean() == []
    assert set(run.writes.values()) == {200}
    stored = await run.stored()
    assert {t: stored.get(t) for t in run.ids} == run.ids
