"""A real PgBouncer (Debian's ``pgbouncer``) in transaction mode in front of the embedded PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
#: PgBouncer's log line for a client that vanished instead of sending Terminate (the PG log's "unexpected EOF").
UNCLEAN_CLIENT = re.compile(r"closing because: client unexpected eof|client_proto: .*unexpected")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgBouncer:
    """One PgBouncer process: its URL (loopback TCP) and its log."""

    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log = log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def unclean_clients(self) -> list[str]:
        return [line for line in self.log_text().splitlines() if UNCLEAN_CLIENT.search(line)]

    def client_closes(self) -> tuple[int, int]:
        """(logins, clean client closes) seen in the log."""
        text = self.log_text()
        return text.count("login attempt:"), text.count("closing because: client close request")


@contextlib.contextmanager
def run_pgbouncer(database_url: str, workdir: Path, pool_size: int) -> Iterator[PgBouncer]:
    """Start PgBouncer (transaction pooling, ``pool_size`` server connections) in front of ``database_url``."""
    if not os.path.exists(PGBOUNCER):
        pytest.skip("PgBouncer IS NOT INSTALLED here (.ci/run installs Debian's pgbouncer); PgBouncer tests skipped")
    socket_dir = make_url(database_url).query["host"]
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    port = free_port()
    ini = workdir / "pgbouncer.ini"
    log = workdir / "pgbouncer.log"
    ini.write_text(
        "[databases]\n"
        f"postgres = host={socket_dir} dbname=postgres user=postgres\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = any\npool_mode = transaction\ndefault_pool_size = {pool_size}\nmax_client_conn = 400\n"
        "ignore_startup_parameters = extra_float_digits\n"
        f"logfile = {log}\npidfile = {workdir / 'pgbouncer.pid'}\n"
    )
    ini.chmod(0o644)
    command = [PGBOUNCER, str(ini)]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root; run it as the user that owns the server's socket
        owner = Path(socket_dir).owner()
        command = [PGBOUNCER, "-u", owner, str(ini)]
        shutil.chown(workdir, owner)
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
        yield PgBouncer(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres", log)
    finally:
        proc.terminate()
        proc.wait(10)
