"""The middleware's options: validated once, by the same rules whether they come from keyword arguments or
from :class:`PoolSettings` (whose environment variables go through the same parsers)."""

from __future__ import annotations

import dataclasses
from typing import TypedDict

from .parse import (
    MAX_WORKERS,
    ConfigError,
    optional_seconds,
    optional_whole,
    pgbouncer_mode,
    seconds,
    whole,
)

DEFAULT_STATS_PATH = "/api/system/database/pool"
#: The longest Retry-After the middleware sends (an hour: longer is a configuration mistake).
MAX_RETRY_AFTER = 3600


class MiddlewareOptions(TypedDict, total=False):
    """The keyword arguments of ``DBPoolMiddleware`` that :meth:`PoolSettings.middleware_options` fills in."""

    leak_threshold: float | None
    retry_after: int
    max_pending: int | None
    workers: int | None
    hosts: int
    pgbouncer: str | None
    pgbouncer_pool_size: int | None
    stats_path: str | None
    stats_token: str | None
    monitor_interval: float
    shutdown_timeout: float
    startup_timeout: float
    production: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """Every option of one middleware, checked at construction. ``None`` (or 0) turns an optional one off.

    ``pgbouncer``: ``None`` means "not said" (startup then looks for a pooler and warns when it finds one);
    ``"off"`` means there is none, and nothing is looked for.
    """

    stats_path: str | None = DEFAULT_STATS_PATH
    stats_token: str | None = None
    monitor_interval: float = 60.0
    shutdown_timeout: float = 10.0
    startup_timeout: float = 10.0
    install_log_filter: bool = True
    leak_threshold: float | None = None
    workers: int | None = None
    hosts: int = 1
    pgbouncer: str | None = None
    pgbouncer_pool_size: int | None = None
    retry_after: int = 1
    max_pending: int | None = None
    production: bool = False  # then pool endpoints without a stats_token get one WARNING at startup

    def __post_init__(self) -> None:
        checked = {
            "monitor_interval": seconds("monitor_interval", self.monitor_interval, allow_zero=False),
            "shutdown_timeout": seconds("shutdown_timeout", self.shutdown_timeout, allow_zero=False),
            "startup_timeout": seconds("startup_timeout", self.startup_timeout, allow_zero=False),
            "leak_threshold": optional_seconds("leak_threshold", self.leak_threshold),
            "workers": optional_whole("workers", self.workers, maximum=MAX_WORKERS),
            "hosts": whole("hosts", self.hosts, minimum=1, maximum=MAX_WORKERS),
            "pgbouncer": None if self.pgbouncer is None else pgbouncer_mode("pgbouncer", self.pgbouncer),
            "pgbouncer_pool_size": optional_whole("pgbouncer_pool_size", self.pgbouncer_pool_size),
            "retry_after": whole("retry_after", self.retry_after, minimum=0, maximum=MAX_RETRY_AFTER),
            "max_pending": optional_whole("max_pending", self.max_pending),
            "stats_path": stats_path(self.stats_path),
        }
        if self.stats_token is not None and not (isinstance(self.stats_token, str) and self.stats_token.strip()):
            raise ConfigError("stats_token='' is empty; set a secret, or pass None for open pool endpoints.")
        for flag in ("install_log_filter", "production"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag}={getattr(self, flag)!r} is not a boolean; use True or False.")
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # normalised: 0 -> None, "Transaction" -> "transaction"


def stats_path(raw: object) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw.startswith("/") or raw.rstrip("/") == "":
        raise ConfigError(f"stats_path={raw!r} must start with '/' and not be '/'; or pass None for no pool endpoints.")
    return raw.rstrip("/")
