"""asgi_dbpool: clean startup, observable pools and an ordered, loop-alive shutdown for ASGI apps on
SQLAlchemy's asyncio engine (asyncpg)."""

from __future__ import annotations

from ._acquire import PoolClosedError, PoolOverloadedError
from ._guard import is_closed_loop_error, is_shutting_down, mark_shutting_down, shutdown_tolerant
from ._logfilter import ShutdownNoiseFilter
from ._middleware import DBPoolMiddleware
from ._settings import ConfigError, PoolSettings, mask_url
from ._startup import StartupError
from ._stats import PoolStatsApp
from ._version import __version__

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
