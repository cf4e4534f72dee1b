"""Parsing one setting: each parser names the variable and the value in its :class:`ConfigError`."""

from __future__ import annotations

import math
import re

from sqlalchemy.engine import URL, make_url


class ConfigError(ValueError):
    """A setting has a value asgi_dbpool cannot use; the message names the variable and the value."""

    __module__ = "asgi_dbpool"  # tracebacks name the public class, not a private module


MAX_CONNECTIONS = 10_000  # no PostgreSQL server takes more from one process
MAX_WORKERS = 1_000
MAX_SECONDS = 7 * 24 * 3600.0
_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
#: Async schemes: the plain PostgreSQL ones mean asyncpg; each driver is tested against a real database.
ASYNC_DRIVERS = frozenset(
    {
        "postgresql",
        "postgres",
        "postgresql+asyncpg",
        "postgresql+psycopg",
        "mysql+aiomysql",
        "mysql+asyncmy",
        "sqlite+aiosqlite",
    }
)
SYNC_DRIVERS = frozenset({"postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg", "postgresql+pg8000"})


def mask_url(url: str | URL) -> str:
    """Render a database URL with its password hidden (``***``); unparsable input is not echoed."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # make_url raises several types for malformed input
        return _PASSWORD.sub(r"\1***@", str(url))


# Each rule takes the raw value as given (an environment string, or a typed keyword argument) and names it
# in the error as given: the environment and the keyword arguments share the rules and the wording.


def whole(name: str, raw: object, *, minimum: int, maximum: int = MAX_CONNECTIONS) -> int:
    value: int | None = None
    if isinstance(raw, str):
        try:
            value = int(raw.strip(), 10)
        except ValueError:
            value = None
    elif isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    if value is None:
        raise ConfigError(f"{name}={raw!r} is not a whole number; set it to an integer from {minimum} to {maximum}.")
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name}={raw!r} is out of range; set it to an integer from {minimum} to {maximum}.")
    return value


def seconds(name: str, raw: object, *, allow_zero: bool) -> float:
    value: float | None = None
    if isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            value = None
    elif isinstance(raw, int | float) and not isinstance(raw, bool):
        value = float(raw)
    if value is None:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds; set it to e.g. 30 or 2.5.")
    low = 0.0 if allow_zero else math.ulp(0.0)
    if not (math.isfinite(value) and low <= value <= MAX_SECONDS):
        bound = "0 (off)" if allow_zero else "a positive number"
        raise ConfigError(f"{name}={raw!r} is out of range; set it to {bound} up to {MAX_SECONDS:g} seconds.")
    return value


def optional_whole(name: str, raw: object, *, maximum: int = MAX_CONNECTIONS) -> int | None:
    """A whole number from 1, or off: ``None`` or 0."""
    if raw is None:
        return None
    return whole(name, raw, minimum=0, maximum=maximum) or None


def optional_seconds(name: str, raw: object) -> float | None:
    """A positive number of seconds, or off: ``None`` or 0."""
    if raw is None:
        return None
    return seconds(name, raw, allow_zero=True) or None


def boolean(name: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use true/false, 1/0, yes/no or on/off.")


def url_value(name: str, raw: str, drivers: frozenset[str]) -> str:
    try:
        url = make_url(raw.strip())
    except Exception as exc:  # make_url raises several types for malformed input
        raise ConfigError(
            f"{name}={mask_url(raw)!r} is not a database URL; use postgresql+asyncpg://user:pass@host/db."
        ) from exc
    if url.drivername not in drivers:
        raise ConfigError(
            f"{name}={mask_url(url)!r} uses the unsupported scheme {url.drivername!r}; use one of {sorted(drivers)}."
        )
    return raw.strip()


def pgbouncer_mode(name: str, raw: object) -> str:
    text = raw.strip().lower() if isinstance(raw, str) else None
    if text not in ("off", "session", "transaction"):
        raise ConfigError(f"{name}={raw!r} is not a PgBouncer pooling mode; use off, session or transaction.")
    return str(text)


def workers_value(name: str, raw: object) -> int:
    """``WEB_CONCURRENCY`` (the worker count uvicorn and gunicorn read too): a whole number from 1."""
    return whole(name, raw, minimum=1, maximum=MAX_WORKERS)


#: Spellings of ENVIRONMENT that mean production (any case); every other name picks the development defaults.
PRODUCTION_NAMES = frozenset({"production", "prod"})


def environment_name(raw: str) -> str:
    """The environment's name, lower case; ``prod`` and ``production`` in any case become ``production``."""
    text = raw.strip().lower()
    if not text or not all(ch.isalnum() or ch in "-_." for ch in text) or len(text) > 64:
        raise ConfigError(f"ENVIRONMENT={raw!r} is not an environment name; use e.g. production or development.")
    return "production" if text in PRODUCTION_NAMES else text
