"""Running the test app under a real server process, driving traffic, and reading what happened."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import websockets
from sqlalchemy.engine import make_url

from tests.conftest import asyncpg_dsn, unclean_disconnects, wait_for_no_backends
from tests.mariadb import MariaDB

ROOT = Path(__file__).resolve().parent.parent
#: Signatures that must never appear in a wrapped server's output.
NOISE_MARKERS = (
    "Event loop is closed",
    "was never awaited",
    "Exception terminating connection",
    "garbage collector is trying to clean up",
    "Traceback (most recent call last)",
    "Exception ignored in",
    "Exception in 'lifespan' protocol",
)
NOISY_LOGGERS = re.compile(
    r"^(WARNING|ERROR|CRITICAL) (sqlalchemy|asyncpg|psycopg|aiomysql|asyncmy|aiosqlite|asyncio|py\.warnings)\b", re.M
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(server: str, target: str, port: int, graceful: float, workers: int = 4) -> list[str]:
    """The command line of ``server``; the ``*-workers`` servers and gunicorn run ``workers`` worker processes."""
    spec = f"tests.apps.server_app:{target}"
    if server == "uvicorn-workers":
        return [sys.executable, "-m", "uvicorn", spec, "--port", str(port), "--workers", str(workers)]
    if server == "hypercorn-workers":
        return [*server_command("hypercorn", target, port, graceful), "--workers", str(workers)]
    if server == "gunicorn":
        return [
            sys.executable,
            "-m",
            "gunicorn",
            spec,
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
            "--worker-class",
            "uvicorn_worker.UvicornWorker",
            "--graceful-timeout",
            str(int(graceful)),
        ]
    if server == "granian-workers":
        return [*server_command("granian", target, port, graceful), "--workers", str(workers)]
    if server == "granian":
        return [
            sys.executable,
            "-m",
            "granian",
            "--interface",
            "asgi",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers-kill-timeout",
            str(max(int(graceful), 1)),
            spec,
        ]
    if server == "uvicorn":
        return [
            sys.executable,
            "-m",
            "uvicorn",
            spec,
            "--port",
            str(port),
            "--timeout-graceful-shutdown",
            str(int(graceful)),
            "--lifespan",
            "on",  # the strict mode: uvicorn prints any exception that escapes the lifespan as a traceback
        ]
    return [
        sys.executable,
        "-m",
        "hypercorn",
        spec,
        "--bind",
        f"127.0.0.1:{port}",
        "--graceful-timeout",
        str(int(graceful)),
    ]


@dataclasses.dataclass
class Run:
    """One server process and what happened to it."""

    server: str
    wrapped: bool
    database_url: str
    log_path: Path
    direct_url: str | None = None  # the PostgreSQL the checks read, when database_url is a PgBouncer's
    mariadb: MariaDB | None = None  # the server behind a mysql+aiomysql/asyncmy database_url (its checks read it)
    aborted_before: dict[str, int] = dataclasses.field(default_factory=dict)  # MariaDB's Aborted_* at start
    log_offset: int = 0  # MariaDB's error log size at start
    name: str = dataclasses.field(default_factory=lambda: f"m_{uuid.uuid4().hex[:10]}")
    port: int = dataclasses.field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    writes: dict[str, Any] = dataclasses.field(default_factory=dict)  # token -> status or error
    ids: dict[str, int] = dataclasses.field(default_factory=dict)  # token -> id answered with 200
    slow: Any = None
    workers: int = 4  # of the multi-process servers

    @property
    def check_url(self) -> str:
        return self.direct_url or self.database_url

    @property
    def backend(self) -> str:
        return make_url(self.database_url).get_backend_name()

    @property
    def sqlite_path(self) -> str:
        return str(make_url(self.database_url).database)

    def mark_server_side(self) -> None:
        """Remember MariaDB's counters and log offset before the run (its checks are deltas)."""
        if self.mariadb is not None:
            self.aborted_before = self.mariadb.aborted()
            self.log_offset = len(self.mariadb.log_text())

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, graceful: float, extra_env: dict[str, str] | None = None) -> None:
        self.mark_server_side()
        env = {
            **os.environ,
            "ASGI_DBPOOL_TEST_DATABASE_URL": self.database_url,
            "MATRIX_APP_NAME": self.name,
            "PYTHONPATH": str(ROOT),
            **(extra_env or {}),
        }
        command = server_command(self.server, "app" if self.wrapped else "bare_app", self.port, graceful, self.workers)
        with self.log_path.open("wb") as out:
            # A session of its own: a hung server is killed with its workers (signals still go to the master only).
            self.proc = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    async def wait_workers(self, count: int = 4) -> None:
        """Every worker finished its startup (the port answers as soon as one has)."""
        assert self.proc is not None
        for _ in range(600):
            output = self.output()
            if len(re.findall(r"^INFO matrix \[\d+\]: app started$", output, re.M)) == count:
                return
            if self.proc.poll() is not None or "Application startup failed" in output:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"not every worker started:\n{self.output()}")

    async def wait_up(self) -> None:
        assert self.proc is not None
        async with httpx.AsyncClient(base_url=self.base) as client:
            for _ in range(400):
                if self.proc.poll() is not None:
                    raise AssertionError(f"server exited early ({self.proc.returncode}):\n{self.output()}")
                try:
                    if (await client.get("/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"server did not come up:\n{self.output()}")

    async def active_sleeps(self) -> int:
        """Requests sleeping in the database now (SQLite: holding their connection, as the app counts them)."""
        if self.backend == "sqlite":
            async with httpx.AsyncClient(base_url=self.base) as client:
                return int((await client.get("/active")).json()["holding"])
        if self.mariadb is not None:
            rows = await asyncio.to_thread(
                self.mariadb.admin,
                "SELECT count(*) FROM information_schema.processlist WHERE info LIKE 'SELECT SLEEP(%' "
                "AND info NOT LIKE '%0.02%'",
            )
            return int(rows[0][0])
        conn = await asyncpg.connect(asyncpg_dsn(self.check_url))
        try:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state = 'active' "
                    "AND query LIKE 'SELECT pg_sleep(%' AND query NOT LIKE '%0.02%'",
                    self.name,
                )
            )
        finally:
            await conn.close()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, limit: float = 30) -> int:
        assert self.proc is not None
        try:
            self.exit_code = await asyncio.to_thread(self.proc.wait, limit)
        finally:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.exit_code

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def noise(self) -> list[str]:
        text = self.output()
        found = [marker for marker in NOISE_MARKERS if marker in text]
        return found + [m.group(0) for m in NOISY_LOGGERS.finditer(text)]

    async def stored(self) -> dict[str, int]:
        if self.backend == "sqlite":
            with contextlib.closing(sqlite3.connect(self.sqlite_path)) as db:
                rows = db.execute("SELECT token, id FROM matrix_writes WHERE run = ?", (self.name,)).fetchall()
            return {token: int(id_) for token, id_ in rows}
        if self.mariadb is not None:
            found = await asyncio.to_thread(
                self.mariadb.admin, f"SELECT token, id FROM app.matrix_writes WHERE run = '{self.name}'"
            )
            return {token: int(id_) for token, id_ in found}
        conn = await asyncpg.connect(asyncpg_dsn(self.check_url))
        try:
            rows = await conn.fetch("SELECT token, id FROM matrix_writes WHERE run = $1", self.name)
            return {row["token"]: row["id"] for row in rows}
        finally:
            await conn.close()

    async def backends_left(self) -> int:
        if self.backend == "sqlite":
            return 0  # no server: what SQLite can tell is in unclean() (a hot journal)
        if self.mariadb is not None:
            return await asyncio.to_thread(self.mariadb.wait_for_no_connections)
        return await wait_for_no_backends(self.check_url, self.name)

    def unclean(self) -> list[str]:
        """What the database saw end uncleanly: PostgreSQL's log lines; MariaDB's Aborted_* counter growth and
        its error-log lines; for SQLite a hot journal (a transaction the process left unfinished) or a damaged file."""
        if self.backend == "sqlite":
            found = [f"hot journal {p}" for p in (self.sqlite_path + "-journal",) if Path(p).exists()]
            with contextlib.closing(sqlite3.connect(self.sqlite_path)) as db:
                check = db.execute("PRAGMA integrity_check").fetchone()[0]
            return found + ([] if check == "ok" else [f"integrity_check: {check}"])
        if self.mariadb is not None:
            now = self.mariadb.aborted()
            grown = [f"{k} +{now[k] - self.aborted_before[k]}" for k in now if now[k] != self.aborted_before[k]]
            return grown + self.mariadb.aborted_lines(self.log_offset)
        return unclean_disconnects([self.name])


async def drive(run: Run, signals: list[tuple[float, int]], write_seconds: float, writes: int = 6) -> None:
    """Leak two sessions, open a WebSocket, start writes and a slow read, then send ``signals`` mid-flight."""
    async with httpx.AsyncClient(base_url=run.base, timeout=30) as client:
        for _ in range(2):
            assert (await client.get("/leak")).status_code == 200
        ws = await websockets.connect(f"ws://127.0.0.1:{run.port}/ws")
        assert await ws.recv() == "ready"

        async def write(token: str) -> None:
            try:
                response = await client.post("/write", params={"token": token, "sleep": write_seconds})
            except httpx.HTTPError as exc:
                run.writes[token] = type(exc).__name__
                return
            run.writes[token] = response.status_code
            if response.status_code == 200:
                run.ids[token] = response.json()["id"]

        async def slow() -> None:
            try:
                run.slow = (await client.get("/slow")).status_code
            except httpx.HTTPError as exc:
                run.slow = type(exc).__name__

        tasks = [asyncio.create_task(write(f"{run.name}-{i}")) for i in range(writes)]
        tasks.append(asyncio.create_task(slow()))
        for _ in range(400):  # every request is in the database now: accepted by the server before the signal
            if await run.active_sleeps() >= writes + 1:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the requests never reached the database")
        for delay, sig in signals:
            await asyncio.sleep(delay)
            run.signal(sig)
        await asyncio.gather(*tasks)
        with contextlib.suppress(websockets.WebSocketException):
            await ws.close()
    await run.wait_exit()
