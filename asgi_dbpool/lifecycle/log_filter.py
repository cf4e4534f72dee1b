"""Demote the known shutdown noise to DEBUG, only while shutting down: a safety net, not the fix."""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Iterable
from typing import Any, TextIO

from ..pool.acquire import PoolClosedError
from .shutdown_flag import is_shutting_down

#: Loggers the filter is attached to; logger filters are not inherited, so each pool logger is named.
DEFAULT_LOGGERS = (
    "sqlalchemy.pool",
    "sqlalchemy.pool.base",
    "sqlalchemy.pool.impl.AsyncAdaptedQueuePool",
    "sqlalchemy.pool.impl.QueuePool",
    "sqlalchemy.pool.impl.NullPool",
    "asyncio",
)

_EXPECTED = ("event loop is closed", "loop is closed", "connection._cancel' was never awaited")
_NEVER = "attached to a different loop"
_CLOSING = ("Exception terminating connection", "Exception closing connection")


def _exception_chain(record: logging.LogRecord) -> list[BaseException]:
    chain: list[BaseException] = []
    exc = record.exc_info[1] if record.exc_info else None
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def is_shutdown_noise(record: logging.LogRecord) -> bool:
    """True for a record that only says the loop went away during shutdown (never a loop mix-up)."""
    chain = _exception_chain(record)
    text = "\n".join([record.getMessage(), *(f"{type(e).__name__}: {e}" for e in chain)]).lower()
    if _NEVER in text:
        return False
    # A background task that outlived shutdown and was refused a connection is reported by asyncio as
    # "Task exception was never retrieved": expected once the engines are closed.
    if any(marker in text for marker in _EXPECTED) or any(isinstance(e, PoolClosedError) for e in chain):
        return True
    # The pool closing a connection whose holder the shutdown cancelled, or whose close it cut short (a database
    # that stopped answering): the shutdown's own doing, which it reports itself (some SQLAlchemy 2.0 releases
    # log that cancellation at ERROR with a traceback).
    closing = record.name.startswith("sqlalchemy.pool") and record.getMessage().startswith(_CLOSING)
    return closing and bool(chain) and isinstance(chain[0], asyncio.CancelledError | TimeoutError)


def is_cancelled_stream_callback(record: logging.LogRecord) -> bool:
    """CPython gh-113538 (fixed in 3.12.2): asyncio logs a cancelled server connection task as an error.

    Servers such as hypercorn cancel their connection tasks when they stop; the StreamReaderProtocol callback
    then calls ``exception()`` on the cancelled task. It is never an error, shutting down or not.
    """
    exc = record.exc_info[1] if record.exc_info else None
    return (
        record.name == "asyncio"
        and isinstance(exc, asyncio.CancelledError)
        and "StreamReaderProtocol.connection_made" in record.getMessage()
    )


class ShutdownNoiseFilter(logging.Filter):
    """A logging filter that demotes shutdown noise to DEBUG while :func:`is_shutting_down` is true.

    Before shutdown the same records are real bugs and keep their level; ``attached to a different
    loop`` always keeps its level. A demoted record is dropped unless its logger has DEBUG enabled.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return True
        if not is_cancelled_stream_callback(record) and not (is_shutting_down() and is_shutdown_noise(record)):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_installed: list[tuple[logging.Logger, ShutdownNoiseFilter]] = []
_original_showwarning: Any = None


def _showwarning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    text = str(message).lower()
    if (
        is_shutting_down()
        and issubclass(category, RuntimeWarning)
        and "was never awaited" in text
        and "_cancel" in text
    ):
        logging.getLogger("asgi_dbpool").debug("demoted during shutdown: %s (%s:%s)", message, filename, lineno)
        return
    _original_showwarning(message, category, filename, lineno, file, line)


def install(extra_loggers: Iterable[str] = ()) -> None:
    """Attach the filter to the pool loggers (idempotent) and route the asyncpg warning through it."""
    global _original_showwarning
    existing = [name for name in logging.root.manager.loggerDict if name.startswith("sqlalchemy.pool")]
    names = {*DEFAULT_LOGGERS, *existing, *extra_loggers}
    have = {lg.name for lg, _ in _installed}
    for name in sorted(names - have):
        lg = logging.getLogger(name)
        flt = ShutdownNoiseFilter()
        lg.addFilter(flt)
        _installed.append((lg, flt))
    if warnings.showwarning is not _showwarning:  # pytest and catch_warnings() swap it back on exit
        _original_showwarning = warnings.showwarning
        warnings.showwarning = _showwarning


def uninstall() -> None:
    """Remove everything :func:`install` added."""
    global _original_showwarning
    while _installed:
        lg, flt = _installed.pop()
        lg.removeFilter(flt)
    if _original_showwarning is not None:
        if warnings.showwarning is _showwarning:
            warnings.showwarning = _original_showwarning
        _original_showwarning = None
