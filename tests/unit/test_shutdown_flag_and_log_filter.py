"""The shutdown flag, ``shutdown_tolerant`` and ``ShutdownNoiseFilter``."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import warnings
from collections.abc import Iterator

import pytest

from asgi_dbpool import ShutdownNoiseFilter, is_shutting_down, mark_shutting_down, shutdown_tolerant
from asgi_dbpool.lifecycle import log_filter as _logfilter
from asgi_dbpool.lifecycle import shutdown_flag
from asgi_dbpool.lifecycle.shutdown_flag import clear_shutting_down
from asgi_dbpool.pool.tracker import PoolClosedError

pytestmark = pytest.mark.anyio


@pytest.fixture
def shutting_down() -> Iterator[None]:
    mark_shutting_down()
    yield
    clear_shutting_down()


@pytest.fixture
def running() -> None:
    clear_shutting_down()


def record(
    message: str,
    exc: BaseException | None = None,
    name: str = "sqlalchemy.pool.impl.AsyncAdaptedQueuePool",
    level: int = logging.ERROR,
) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord(name, level, __file__, 1, message, (), exc_info)


# -- shutdown_tolerant ---------------------------------------------------------------------------------
@shutdown_tolerant(default="fallback")
async def closed_loop() -> str:
    raise RuntimeError("Event loop is closed")


@shutdown_tolerant(default="fallback")
async def other_runtime_error() -> str:
    raise RuntimeError("dictionary changed size during iteration")


@shutdown_tolerant()
async def fine() -> int:
    return 7


async def test_guard_returns_default_only_during_shutdown(
    shutting_down: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="asgi_dbpool")
    assert await closed_loop() == "fallback"
    assert await fine() == 7
    with pytest.raises(RuntimeError, match="dictionary changed size"):
        await other_runtime_error()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("DEBUG", "closed_loop: ignored RuntimeError('Event loop is closed') during shutdown; returning 'fallback'")
    ]


async def test_guard_reraises_outside_shutdown(running: None) -> None:
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        await closed_loop()


async def test_guard_as_context_manager(shutting_down: None) -> None:
    reached = []
    async with shutdown_tolerant():
        reached.append(1)
        raise RuntimeError("the loop is closed")
    assert reached == [1]
    with pytest.raises(ValueError, match="loop is closed"):
        async with shutdown_tolerant():
            raise ValueError("loop is closed")  # not a RuntimeError: never swallowed


def test_guard_rejects_sync_functions() -> None:
    with pytest.raises(TypeError, match="decorates async functions only"):
        shutdown_tolerant()(lambda: None)


def test_flag_lifecycle() -> None:
    clear_shutting_down()
    assert is_shutting_down() is False
    mark_shutting_down()
    assert is_shutting_down() is True
    clear_shutting_down()


def test_the_flag_holds_apps_weakly() -> None:
    """An app dropped in the middle of its shutdown (a test that let it go) no longer holds the process-wide flag:
    the flag keeps each app's lifecycle weakly, not its id(), which a later object may reuse."""

    class App:  # stands for a Lifecycle: the flag only needs a weakly referenceable key
        pass

    clear_shutting_down()
    first, second = App(), App()
    shutdown_flag.app_started(first)
    shutdown_flag.app_started(second)
    shutdown_flag.app_stopping(first)
    assert is_shutting_down() is True
    del first
    gc.collect()
    assert is_shutting_down() is False  # the other app still runs: no leftover judged by a finished shutdown
    shutdown_flag.app_stopping(second)
    shutdown_flag.app_stopped(second)
    assert is_shutting_down() is True  # the last running app has shut down
    clear_shutting_down()


# -- ShutdownNoiseFilter -------------------------------------------------------------------------------
NOISE = [
    record("Exception terminating connection <AdaptedConnection>", RuntimeError("Event loop is closed")),
    record("Exception closing connection", RuntimeError("the loop is closed")),
    record("Task exception was never retrieved", PoolClosedError("disposed"), name="asyncio"),
    # the pool closing a connection whose holder the shutdown cancelled (SQLAlchemy 2.0.44 logs it at ERROR)
    record("Exception terminating connection <AdaptedConnection>", asyncio.CancelledError()),
    record("Exception closing connection <AdaptedConnection>", TimeoutError()),
]
IDS = ["terminating", "closing", "never-retrieved", "cancelled-close", "cut-close"]


def test_a_real_error_while_closing_keeps_its_level(shutting_down: None) -> None:
    """Only the shutdown's own cancellation and cut are demoted: a failing close is still an ERROR."""
    rec = record("Exception terminating connection <AdaptedConnection>", OSError("broken pipe"))
    rec.levelno, rec.levelname = logging.ERROR, "ERROR"
    assert ShutdownNoiseFilter().filter(rec) is True
    assert rec.levelno == logging.ERROR


@pytest.mark.parametrize("rec", NOISE, ids=IDS)
def test_filter_demotes_noise_during_shutdown(rec: logging.LogRecord, shutting_down: None) -> None:
    rec.levelno, rec.levelname = logging.ERROR, "ERROR"
    passed = ShutdownNoiseFilter().filter(rec)
    assert (rec.levelno, rec.levelname) == (logging.DEBUG, "DEBUG")
    assert passed is logging.getLogger(rec.name).isEnabledFor(logging.DEBUG)


@pytest.mark.parametrize("rec", NOISE, ids=IDS)
def test_filter_keeps_the_level_before_shutdown(rec: logging.LogRecord, running: None) -> None:
    rec.levelno, rec.levelname = logging.ERROR, "ERROR"
    assert ShutdownNoiseFilter().filter(rec) is True
    assert rec.levelno == logging.ERROR


def test_filter_never_demotes_a_loop_mixup(shutting_down: None) -> None:
    rec = record(
        "Exception terminating connection",
        RuntimeError("Task got Future attached to a different loop; the loop is closed"),
    )
    assert ShutdownNoiseFilter().filter(rec) is True
    assert rec.levelno == logging.ERROR


def test_filter_leaves_other_errors_alone(shutting_down: None) -> None:
    rec = record("Exception terminating connection", OSError("connection reset by peer"))
    assert ShutdownNoiseFilter().filter(rec) is True
    assert rec.levelno == logging.ERROR


def test_installed_filter_reaches_handlers_at_debug_only(shutting_down: None) -> None:
    seen: list[tuple[str, int]] = []

    class Collect(logging.Handler):
        def emit(self, rec: logging.LogRecord) -> None:
            seen.append((rec.getMessage(), rec.levelno))

    handler = Collect(level=logging.INFO)
    pool_logger = logging.getLogger("sqlalchemy.pool.impl.AsyncAdaptedQueuePool")
    pool_logger.addHandler(handler)
    _logfilter.install()
    try:
        pool_logger.error("Exception terminating connection", exc_info=RuntimeError("Event loop is closed"))
        pool_logger.error("Exception terminating connection", exc_info=OSError("reset"))
    finally:
        _logfilter.uninstall()
        pool_logger.removeHandler(handler)
    assert seen == [("Exception terminating connection", logging.ERROR)]


def test_asyncpg_cancel_warning_is_demoted_during_shutdown(shutting_down: None) -> None:
    shown: list[str] = []
    original = warnings.showwarning
    warnings.showwarning = lambda message, *args, **kwargs: shown.append(str(message))  # type: ignore[assignment]
    _logfilter.install()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            # catch_warnings restores showwarning on exit; inside it ours is what warnings.warn uses
            warnings.showwarning = _logfilter._showwarning
            warnings.warn("coroutine 'Connection._cancel' was never awaited", RuntimeWarning, stacklevel=1)
            warnings.warn("coroutine 'my_job' was never awaited", RuntimeWarning, stacklevel=1)
    finally:
        _logfilter.uninstall()
        warnings.showwarning = original
    assert shown == ["coroutine 'my_job' was never awaited"]
    assert sys.modules["asgi_dbpool.lifecycle.log_filter"]._original_showwarning is None


@pytest.mark.parametrize("flag", [True, False], ids=["shutting-down", "running"])
def test_cancelled_stream_callback_is_always_demoted(flag: bool) -> None:
    """CPython gh-113538: a cancelled server connection task logged as an error by asyncio itself."""
    (mark_shutting_down if flag else clear_shutting_down)()
    message = "Exception in callback StreamReaderProtocol.connection_made.<locals>.callback(<Task cancelled>)"
    rec = record(message, asyncio.CancelledError(), name="asyncio")
    other = record("Exception in callback Foo.bar()", asyncio.CancelledError(), name="asyncio")
    try:
        ShutdownNoiseFilter().filter(rec)
        ShutdownNoiseFilter().filter(other)
    finally:
        clear_shutting_down()
    assert rec.levelno == logging.DEBUG
    assert other.levelno == logging.ERROR
