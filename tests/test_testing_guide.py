"""docs/testing-your-app.md runs. Each ```python block starts with its file name (``# test_notes.py``); the
test files are written next to ``myapp.py`` and run together, as a user would keep them, by one pytest process
on a database of its own on the session's PostgreSQL (``DATABASE_URL``). The outcome must be exact: every test
of each file passed, the count per file, and no log record of WARNING or above but the one WARNING the page
says the first request without a lifespan gives. The server must have seen every connection end cleanly, and
the messages and defaults the page quotes are the library's."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import asyncpg
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.testclient import TestClient

import asgi_dbpool
from asgi_dbpool import DBPoolMiddleware, StartupError
from asgi_dbpool.lifecycle.shutdown import FORCE_EXIT_BUDGET
from tests import conftest

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "testing-your-app.md"
APP = "myapp.py"
ANYIO_STREAM_NOISE = [
    f"ignore:Exception ignored in. <function MemoryObject{kind}Stream.__del__:pytest.PytestUnraisableExceptionWarning"
    for kind in ("Receive", "Send")
] + [f"ignore:Unclosed <MemoryObject{kind}Stream:ResourceWarning" for kind in ("Receive", "Send")]
CONFTEST = "conftest.py"  # the page's fixture for every test file (anyio's backend)
NO_LIFESPAN = "DBPoolMiddleware is serving a request but no lifespan is running"

#: Each test file of the page, in the page's order, and how many tests it runs (all must pass).
EXPECTED = {
    "test_notes.py": 2,
    "test_notes_async.py": 2,
    "test_isolated.py": 2,
    "test_overrides.py": 1,
    "test_failures.py": 4,
    "test_without_lifespan.py": 4,
    "test_slow_shutdown.py": 2,
    "test_plain_asgi.py": 2,
}
#: The only log records of WARNING or above in the whole run: one, at the first request served without a lifespan
#: (the module-level ``myapp.app`` was served with lifespans before, by the earlier files).
LOGGED = {"test_without_lifespan.py::test_health": [f"WARNING asgi_dbpool {NO_LIFESPAN} "]}
LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ ")


def fenced(language: str) -> list[str]:
    """The page's fenced blocks whose info string is ``language`` ("" for plain ones), each ending in a newline."""
    found: list[str] = []
    info: str | None = None  # the info string of the block we are in; None between blocks
    lines: list[str] = []
    for line in GUIDE.read_text().splitlines():
        if not line.startswith("```"):
            lines.append(line)
        elif info is None:
            info, lines = line[3:].strip(), []
        else:
            if info == language:
                found.append("\n".join(lines) + "\n")
            info = None
    return found


def blocks() -> dict[str, str]:
    """The page's python blocks by the file name on their first line."""
    found: dict[str, str] = {}
    for source in fenced("python"):
        first = source.splitlines()[0]
        match = re.fullmatch(r"# (\w+\.py)", first)
        assert match, f"a python block must start with '# <file>.py', not {first!r}"
        assert match[1] not in found, f"two blocks named {match[1]}"
        found[match[1]] = source
    return found


@dataclass
class Case:
    file: str
    name: str
    outcome: str  # passed, failed, error or skipped
    logged: list[str]  # the records captured at WARNING and above, as "LEVEL logger message"


@dataclass
class Run:
    returncode: int
    output: str
    cases: list[Case]
    database: str
    server_log: str | None  # what the embedded server logged meanwhile; None for an outside server


async def _admin(url: str, statement: str) -> None:
    conn = await asyncpg.connect(conftest.asyncpg_dsn(url))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def _cases(report: Path) -> list[Case]:
    cases = []
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        captured = "\n".join(child.text or "" for child in case if child.tag in ("system-out", "system-err"))
        logged = [line for line in captured.splitlines() if LOG_LINE.match(line)]
        cases.append(Case(case.get("classname", "") + ".py", case.get("name", ""), outcome, logged))
    return cases


@pytest.fixture(scope="module")
def run(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The page's test files run together, in the page's order, by one pytest process."""
    sources = blocks()
    tmp_path = tmp_path_factory.mktemp("guide")
    database = f"guide_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(database_url, f'CREATE DATABASE "{database}"'))
    log = conftest.SERVER_LOG
    offset = log.stat().st_size if log is not None else 0
    for name in [APP, CONFTEST, *EXPECTED]:
        (tmp_path / name).write_text(sources[name])
    # A user's project of its own: without it, pytest would take the configuration of a checkout above tmp_path
    # (CI keeps its temporary files inside the checkout).
    # The lowest test tools (Starlette 0.40's TestClient on an older anyio) leave anyio memory streams to the garbage
    # collector now and then: ignored as the repository's own configuration ignores them.
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nfilterwarnings =\n    error\n" + "".join(f"    {line}\n" for line in ANYIO_STREAM_NOISE)
    )
    package_root = str(Path(asgi_dbpool.__file__).resolve().parent.parent)  # the asgi_dbpool under test
    env = {
        **os.environ,
        "DATABASE_URL": make_url(database_url).set(database=database).render_as_string(hide_password=False),
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",  # only anyio's plugin (-p anyio), which the page's tests use
    }
    env.pop("PYTEST_ADDOPTS", None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "anyio"]  # errors: pytest.ini
    command += ["--log-level=WARNING", "--log-format=%(levelname)s %(name)s %(message)s"]
    command += ["-o", "junit_logging=all", "--junitxml=report.xml", *EXPECTED]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    # Every session ended: DROP DATABASE refuses a database someone is still connected to.
    asyncio.run(_admin(database_url, f'DROP DATABASE "{database}"'))
    server_log = log.read_text(errors="replace")[offset:] if log is not None else None
    cases = _cases(tmp_path / "report.xml") if (tmp_path / "report.xml").exists() else []
    return Run(done.returncode, done.stdout + done.stderr, cases, database, server_log)


def test_every_block_is_a_file_the_suite_runs() -> None:
    assert list(blocks()) == [APP, CONFTEST, *EXPECTED]


def test_every_test_of_every_file_passes(run: Run) -> None:
    total = sum(EXPECTED.values())
    assert run.output.splitlines()[-1].startswith(f"{total} passed in "), run.output
    assert run.returncode == 0
    assert Counter(case.file for case in run.cases) == EXPECTED
    assert [f"{c.file}::{c.name}" for c in run.cases if c.outcome != "passed"] == []


def test_the_one_warning_and_nothing_else_logged(run: Run) -> None:
    """No ``Event loop is closed``, no pool ``Exception terminating connection``: only the page's one WARNING
    (the GC's unraisable errors and ``never awaited`` warnings would fail their test, under ``-W error``)."""
    logged = {f"{c.file}::{c.name}": c.logged for c in run.cases if c.logged}
    assert list(logged) == list(LOGGED)
    for test, prefixes in LOGGED.items():
        assert len(logged[test]) == len(prefixes)
        assert all(line.startswith(p) for line, p in zip(logged[test], prefixes, strict=True)), logged[test]


def test_the_server_saw_every_connection_end_cleanly(run: Run) -> None:
    if run.server_log is None:
        pytest.skip("an outside server: its log is not ours to read")
    lines = run.server_log.splitlines()
    ours = [line for line in lines if "disconnection:" in line and f"database={run.database}" in line]
    assert len(ours) > 10  # the control: the window holds the run's own sessions
    assert [line for line in lines if any(marker in line for marker in conftest.UNCLEAN_DISCONNECT)] == []


def test_the_quoted_startup_error_is_the_real_one() -> None:
    engine = create_async_engine("postgresql+asyncpg://app:s3cret@127.0.0.1:1/appdb")
    started = time.monotonic()
    with pytest.raises(StartupError) as raised, TestClient(DBPoolMiddleware(Starlette(), engine)):
        pytest.fail("the with block was entered")  # pragma: no cover
    assert time.monotonic() - started < 2  # "at once"
    assert str(raised.value) + "\n" in fenced("")


def test_the_quoted_warning_is_the_real_one(run: Run) -> None:
    assert f"{NO_LIFESPAN} (...)\n" in fenced("")
    (case,) = [c for c in run.cases if c.logged]
    assert case.logged[0].startswith(f"WARNING asgi_dbpool {NO_LIFESPAN} (a test client used without 'with'")


def test_the_timeouts_the_page_quotes() -> None:
    text = " ".join(GUIDE.read_text().split())
    manager = inspect.signature(LifespanManager).parameters["shutdown_timeout"].default
    middleware = inspect.signature(DBPoolMiddleware).parameters["shutdown_timeout"].default
    assert (manager, middleware, FORCE_EXIT_BUDGET) == (5, 10.0, 5.0)
    assert "(5 by default)" in text
    assert "The middleware's own `shutdown_timeout` is 10 s." in text
    assert "within min(`shutdown_timeout`, 5 s)" in text
