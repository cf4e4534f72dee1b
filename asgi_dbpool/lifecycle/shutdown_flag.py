"""The process-wide shutdown flag and the narrow closed-loop guard built on it."""

from __future__ import annotations

import functools
import inspect
import logging
import types
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Generic, ParamSpec, TypeVar, overload

logger = logging.getLogger("asgi_dbpool")

P = ParamSpec("P")
T = TypeVar("T")
D = TypeVar("D")

# The process-wide flag, from every app's lifecycle (the lifecycle itself, weakly: an id() can be reused by
# another object once the first is gone) and the manual mark.
_marked = False
_running: weakref.WeakSet[Any] = weakref.WeakSet()
_stopping: weakref.WeakSet[Any] = weakref.WeakSet()
_stopped = False  # an app in this process has finished its shutdown

#: Messages that mean "the event loop is gone", as asyncio and asyncpg word them.
CLOSED_LOOP_MARKERS = ("event loop is closed", "loop is closed")


def is_shutting_down() -> bool:
    """Return True while the process is shutting down, as far as its ``DBPoolMiddleware`` apps can tell.

    That is: while any app in this process is in its shutdown (set as its very first step), and after the
    last running app has shut down (garbage-collected leftovers are judged by it), or after
    :func:`mark_shutting_down`. An app starting clears neither another app's shutdown nor its leftovers while
    that other app is still shutting down. One app's own state is ``request.state.asgi_dbpool.shutting_down``.
    """
    return _marked or bool(_stopping) or (_stopped and not _running)


def mark_shutting_down() -> None:
    """Set the process-wide shutdown flag by hand (a custom server may); the next app startup clears it."""
    global _marked
    _marked = True


def clear_shutting_down() -> None:
    """Forget every app's shutdown and the manual mark (for tests and tools that reuse one process)."""
    global _marked, _stopped
    _marked = _stopped = False
    _stopping.clear()
    _running.clear()


def app_started(key: object) -> None:
    global _marked
    _marked = False
    _stopping.discard(key)
    _running.add(key)


def app_stopping(key: object) -> None:
    _running.discard(key)
    _stopping.add(key)


def app_stopped(key: object) -> None:
    global _stopped
    _stopping.discard(key)
    _running.discard(key)
    _stopped = True


def is_closed_loop_error(exc: BaseException) -> bool:
    """True for a ``RuntimeError`` whose message says the event loop is closed."""
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in CLOSED_LOOP_MARKERS)


class shutdown_tolerant(Generic[D]):
    """Turn a closed-loop ``RuntimeError`` into ``default``, but only while shutting down.

    As a decorator for ``async def`` functions::

        @shutdown_tolerant(default=None)
        async def get_user(session, user_id): ...

    or as an async context manager (the block is left early and the error is dropped)::

        async with shutdown_tolerant():
            await session.commit()

    Every other exception, and the same ``RuntimeError`` outside a shutdown, is re-raised.
    """

    @overload
    def __init__(self: shutdown_tolerant[None]) -> None: ...

    @overload
    def __init__(self, default: D) -> None: ...

    def __init__(self, default: Any = None) -> None:
        self.default = default

    def __call__(self, func: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T | D]]:
        if not inspect.iscoroutinefunction(func):
            raise TypeError(
                f"shutdown_tolerant decorates async functions only, got {func!r}; wrap the sync call site instead."
            )

        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await func(*args, **kwargs)
            except RuntimeError as exc:
                if not self._tolerates(exc):
                    raise
                logger.debug("%s: ignored %r during shutdown; returning %r", func.__qualname__, exc, self.default)
                return self.default

        return wrapper

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> bool:
        if exc is None or not self._tolerates(exc):
            return False
        logger.debug("ignored %r during shutdown", exc)
        return True

    @staticmethod
    def _tolerates(exc: BaseException) -> bool:
        return is_shutting_down() and is_closed_loop_error(exc)
