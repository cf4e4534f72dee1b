"""asgi_dbpool: clean startup, observable pools and an ordered, loop-alive shutdown for ASGI apps on
SQLAlchemy's asyncio engine (asyncpg)."""

from __future__ import annotations

from ._version import __version__
from .asgi.middleware import DBPoolMiddleware
from .asgi.stats_app import PoolStatsApp
from .config.settings import ConfigError, PoolSettings, mask_url
from .lifecycle.log_filter import ShutdownNoiseFilter
from .lifecycle.shutdown_flag import is_closed_loop_error, is_shutting_down, mark_shutting_down, shutdown_tolerant
from .lifecycle.startup import StartupError
from .pool.acquire import PoolClosedError, PoolOverloadedError

__all__ = [
    "ConfigError",
    "DBPoolMiddleware",
    "PoolClosedError",
    "PoolOverloadedError",
    "PoolSettings",
    "PoolStatsApp",
    "ShutdownNoiseFilter",
    "StartupError",
    "__version__",
    "is_closed_loop_error",
    "is_shutting_down",
    "mark_shutting_down",
    "mask_url",
    "shutdown_tolerant",
]
