"""The README's FastAPI example, verbatim, served by a real ``python -m uvicorn notes:app`` on a database of its
own: a note written (201) and read back (200), then Ctrl+C or SIGTERM, uvicorn's normal exit, and the output is
the run the README shows (numbers aside): the middleware's startup and shutdown lines, nothing else. No backend
is left, and the server saw every connection of the app end cleanly."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from asgi_dbpool.config.settings import ENV_READERS
from tests import conftest

README = Path(__file__).resolve().parent.parent / "README.md"
NOISE = ("Traceback", "Event loop is closed", "was never awaited", "Exception terminating", "garbage collector")

pytestmark = [pytest.mark.anyio, pytest.mark.servers]


def example() -> tuple[str, str, list[str]]:
    """The README's FastAPI block, the module name its run line serves, and the lines that run shows."""
    section = README.read_text().split("## A FastAPI app\n", 1)[1].split("\n## ", 1)[0]
    (source,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    (run,) = re.findall(r"```console\n(.*?)```", section, flags=re.S)
    command, *shown = run.splitlines()
    match = re.fullmatch(r"\$ ASYNC_DATABASE_URL=\S+ uvicorn (\w+):app", command)
    assert match, f"the run line is not 'uvicorn <module>:app': {command!r}"
    return source, match[1], [line.removeprefix("^C") for line in shown]  # ^C: the terminal's echo of Ctrl+C


def normalized(lines: list[str]) -> list[str]:
    """Lines with every number (pid, port, id, seconds) as N."""
    return [re.sub(r"\d+", "N", line) for line in lines]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def admin(url: str, statement: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(conftest.asyncpg_dsn(url))
    try:
        return await conn.fetch(statement, *args)
    finally:
        await conn.close()


async def backends(url: str, database: str) -> list[int]:
    """The pids of the backends connected to ``database`` now (other than ours)."""
    rows = await admin(url, "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", database)
    return [row["pid"] for row in rows]


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[str]:
    """A database of its own for the example's ``notes`` table, dropped after the test."""
    name = f"readme_{uuid.uuid4().hex[:12]}"
    await admin(database_url, f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        await admin(database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


#: How the run is stopped, its URL variable, and uvicorn's exit status: 0 after Ctrl+C (SIGINT); after SIGTERM,
#: once shut down cleanly, uvicorn re-raises the signal (as tests/test_servers.py expects too).
STOPS = {
    "ctrl-c": (signal.SIGINT, "ASYNC_DATABASE_URL", 0),
    "sigterm": (signal.SIGTERM, "DATABASE_URL", -signal.SIGTERM),
}


@pytest.mark.parametrize("stop", STOPS)
async def test_the_readme_fastapi_example_serves_and_stops_as_shown(
    stop: str, database_url: str, database: str, tmp_path: Path
) -> None:
    stop_signal, variable, exit_status = STOPS[stop]
    source, module, shown = example()
    (tmp_path / f"{module}.py").write_text(source)
    url = make_url(database_url).set(database=database)
    if variable == "DATABASE_URL":  # the example's "else DATABASE_URL": a plain PostgreSQL URL gets asyncpg
        url = url.set(drivername="postgresql")
    env = {k: v for k, v in os.environ.items() if k not in ENV_READERS and k != "ENVIRONMENT"}
    env[variable] = url.render_as_string(hide_password=False)
    # The asgi_dbpool under test next to the module; unbuffered, so uvicorn's access lines (stdout) and the log
    # lines (stderr) reach the output in the order they were written.
    package_root = str(README.parent)
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), package_root]), PYTHONUNBUFFERED="1")
    port = free_port()
    log = tmp_path / "output.txt"
    server_log = conftest.SERVER_LOG
    offset = server_log.stat().st_size if server_log is not None else 0
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - a real server process that gets a real signal
            [sys.executable, "-m", "uvicorn", f"{module}:app", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        for _ in range(400):
            if "Uvicorn running on" in log.read_text() or proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert "Uvicorn running on" in log.read_text(), log.read_text()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            written = await client.post("/notes", params={"text": "hello"})
            assert written.status_code == 201, log.read_text()
            note_id = written.json()["id"]
            assert isinstance(note_id, int)
            read = await client.get(f"/notes/{note_id}")
            assert (read.status_code, read.json()) == (200, {"id": note_id, "text": "hello"})
        pids = await backends(database_url, database)  # the app's pooled connection(s), idle now
        assert pids
        proc.send_signal(stop_signal)
        code = await asyncio.to_thread(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert code == exit_status, output
    for marker in NOISE:
        assert marker not in output, output
    assert re.search(r"^INFO:asgi_dbpool:1 engine\(s\) reachable; pool monitor started$", output, re.M), output
    assert re.search(r"^INFO:asgi_dbpool:shutdown finished in [\d.]+s$", output, re.M), output
    assert normalized(output.splitlines()) == normalized(shown)  # what the README shows, line for line

    remaining = await backends(database_url, database)
    for _ in range(100):
        if not remaining:
            break
        await asyncio.sleep(0.02)  # a backend leaves pg_stat_activity just after its socket closes
        remaining = await backends(database_url, database)
    assert remaining == [], output
    if server_log is not None:  # the embedded server logged each of the app's connections ending, cleanly
        for _ in range(100):
            lines = server_log.read_text(errors="replace")[offset:].splitlines()
            ours = [line for line in lines if any(f"[{pid}] " in line for pid in pids)]
            if all(any(f"[{pid}] " in line and "disconnection:" in line for line in ours) for pid in pids):
                break
            await asyncio.sleep(0.02)  # the server's log is written a moment after the backend left
        else:
            raise AssertionError(f"not every connection's end is logged: {ours}")
        assert [line for line in ours if any(u in line for u in conftest.UNCLEAN_DISCONNECT)] == []
