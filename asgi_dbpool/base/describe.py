"""How an exception and a task are named in one log line."""

from __future__ import annotations

import asyncio
from typing import Any


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (server log parsers and humans both want that)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def describe_task(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    where = getattr(coro, "__qualname__", type(coro).__name__)
    return f"{task.get_name()} ({where})"
