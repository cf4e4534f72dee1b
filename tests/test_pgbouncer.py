"""A real PgBouncer in transaction mode in front of the embedded PostgreSQL: DB_PGBOUNCER=transaction makes
prepared statements work; the control (setting off) shows the well-known asyncpg failures."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from asgi_dbpool import PoolSettings

pytestmark = pytest.mark.anyio
PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def pgbouncer_url(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not os.path.exists(PGBOUNCER):
        pytest.skip("PgBouncer IS NOT INSTALLED here (.ci/run installs Debian's pgbouncer); PgBouncer tests skipped")
    url = make_url(database_url)
    socket_dir = url.query["host"]
    workdir = tmp_path_factory.mktemp("pgbouncer")
    workdir.chmod(0o755)
    port = free_port()
    ini = workdir / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"postgres = host={socket_dir} dbname=postgres user=postgres\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        "auth_type = any\npool_mode = transaction\ndefault_pool_size = 2\nmax_client_conn = 200\n"
        "ignore_startup_parameters = extra_float_digits,application_name\n"
        f"logfile = {workdir / 'pgbouncer.log'}\npidfile = {workdir / 'pgbouncer.pid'}\n"
    )
    ini.chmod(0o644)
    command = [PGBOUNCER, str(ini)]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root; run it as the embedded server's user
        command = [PGBOUNCER, "-u", "pgserver", str(ini)]
        shutil.chown(workdir, "pgserver")
    errlog = workdir / "stderr.log"
    with errlog.open("wb") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"pgbouncer exited: {errlog.read_text()}")
            time.sleep(0.025)
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"
    finally:
        proc.terminate()
        proc.wait(10)


async def hammer(settings: PoolSettings, url: str, tasks: int = 40, rounds: int = 5) -> list[str]:
    """Concurrent parameterised queries (prepared statements in play); the error messages seen."""
    engine = settings.create_async_engine(url)
    errors: list[str] = []

    async def worker(i: int) -> None:
        for r in range(rounds):
            try:
                async with engine.connect() as conn:
                    value = (
                        await conn.execute(text("SELECT CAST(:a AS int) + CAST(:b AS int)"), {"a": i, "b": r})
                    ).scalar_one()
                    assert value == i + r
            except DBAPIError as exc:
                errors.append(str(exc.orig))

    try:
        await asyncio.gather(*(worker(i) for i in range(tasks)))
    finally:
        await engine.dispose()
    return errors


async def test_transaction_mode_setting_makes_prepared_statements_work(pgbouncer_url: str) -> None:
    settings = PoolSettings.from_env({"DB_PGBOUNCER": "transaction", "DB_POOL_SIZE": "20", "DB_POOL_PRE_PING": "0"})
    assert await hammer(settings, pgbouncer_url) == []


async def test_control_without_the_setting_fails(pgbouncer_url: str) -> None:
    settings = PoolSettings.from_env({"DB_POOL_SIZE": "20", "DB_POOL_PRE_PING": "0"})
    errors = await hammer(settings, pgbouncer_url)
    assert errors, "the control shows no failure: the test would prove nothing"
    assert all("prepared statement" in e for e in errors), errors[:3]


def test_the_setting_is_validated() -> None:
    from asgi_dbpool import ConfigError

    with pytest.raises(ConfigError, match="DB_PGBOUNCER='statement' is not a PgBouncer pooling mode"):
        PoolSettings.from_env({"DB_PGBOUNCER": "statement"})
