"""A real MariaDB (Debian's ``mariadb-server``) for the tests: a fresh data directory, loopback TCP, its error log.

Started once per test session by ``conftest.mariadb_server``; skipped loudly only when the package is absent.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

MARIADBD = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
CLIENT = shutil.which("mariadb") or "/usr/bin/mariadb"
INSTALL_DB = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
USER, PASSWORD, DATABASE = "app", "app", "app"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MariaDB:
    """One ``mariadbd`` process in ``workdir``: URLs, status counters, the error log."""

    def __init__(self, workdir: Path) -> None:
        if not os.path.exists(MARIADBD):
            pytest.skip(
                "MariaDB IS NOT INSTALLED here (.ci/run installs Debian's mariadb-server); MariaDB tests skipped"
            )
        self.workdir = workdir.resolve()
        self.datadir = self.workdir / "data"
        self.socket = self.workdir / "mysqld.sock"
        self.log = self.workdir / "error.log"
        self.port = free_port()
        self.admin_sessions = 0
        # A temporary directory of its own: two servers bootstrapping at once in /tmp (two CI columns) collide on
        # the names of their temporary tables ("Unknown table 'mysql.tmp_user_sys'").
        tmpdir = self.workdir / "tmp"
        tmpdir.mkdir()
        installed = subprocess.run(
            [INSTALL_DB, "--no-defaults", f"--datadir={self.datadir}", "--user=root", "--skip-test-db",
             "--auth-root-authentication-method=normal", f"--tmpdir={tmpdir}"],
            check=False, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if installed.returncode:
            raise RuntimeError(
                f"mariadb-install-db failed ({installed.returncode}): {installed.stdout}{installed.stderr}"
            )
        self._stderr = (self.workdir / "stderr.log").open("wb")
        self.proc = subprocess.Popen(
            [MARIADBD, "--no-defaults", f"--datadir={self.datadir}", "--user=root", f"--socket={self.socket}",
             f"--port={self.port}", "--bind-address=127.0.0.1", f"--log-error={self.log}",
             f"--pid-file={self.workdir / 'mariadb.pid'}", "--skip-name-resolve", f"--tmpdir={tmpdir}",
             # 3: aborted connections (a client that vanished without COM_QUIT) are written to the error log too.
             "--log-warnings=3", "--max-connections=100", "--innodb-buffer-pool-size=16M",
             "--skip-log-bin", "--innodb-log-file-size=8M"],
            stdout=subprocess.DEVNULL, stderr=self._stderr,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                self.admin("SELECT 1")
                break
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mariadbd did not start: {self.log_text()[-2000:]}") from None
                time.sleep(0.1)
        self.admin(
            f"CREATE DATABASE {DATABASE}",
            f"CREATE USER '{USER}'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}'",
            f"GRANT ALL ON *.* TO '{USER}'@'127.0.0.1'",
        )

    def url(self, driver: str) -> str:
        return f"mysql+{driver}://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{DATABASE}"

    def admin(self, *statements: str) -> list[tuple[str, ...]]:
        """Run statements as root over the unix socket with the ``mariadb`` client; the rows, as text.

        The client program, not PyMySQL: no Python socket of ours is left to the garbage collector."""
        self.admin_sessions += 1  # each call is one session in the server's Connections counter
        proc = subprocess.run(
            [CLIENT, "--no-defaults", f"--socket={self.socket}", "--user=root", "--batch", "--skip-column-names",
             "--connect-timeout=2", "-e", ";\n".join(statements)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if proc.returncode:
            raise RuntimeError(f"mariadb client: {proc.stderr.strip()}")
        return [tuple(line.split("\t")) for line in proc.stdout.splitlines()]

    def aborted(self) -> dict[str, int]:
        """``Aborted_clients`` (a client vanished mid-session) and ``Aborted_connects`` (a failed connect)."""
        return {name: int(value) for name, value in self.admin("SHOW GLOBAL STATUS LIKE 'Aborted_%'")}

    def status(self) -> dict[str, int]:
        """``Aborted_*`` and ``Connections`` (every session ever opened, this query's own included)."""
        rows = self.admin("SHOW GLOBAL STATUS WHERE Variable_name LIKE 'Aborted\\_%' OR Variable_name = 'Connections'")
        return {name: int(value) for name, value in rows}

    def connections_of(self, user: str = USER) -> int:
        """Sessions of ``user`` open on the server right now."""
        return int(self.admin(f"SELECT count(*) FROM information_schema.processlist WHERE user = '{user}'")[0][0])

    def wait_for_no_connections(self, user: str = USER) -> int:
        count = self.connections_of(user)
        for _ in range(100):
            if not count:
                break
            time.sleep(0.02)  # a session leaves the processlist just after its socket closes
            count = self.connections_of(user)
        return count

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def aborted_lines(self, since: int = 0) -> list[str]:
        """Error-log lines about aborted connections written after offset ``since``."""
        return [line for line in self.log_text()[since:].splitlines() if "Aborted connection" in line]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._stderr.close()
