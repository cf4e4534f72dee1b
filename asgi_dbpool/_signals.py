"""Hearing a shutdown signal while startup runs, so a startup that waits on a database that does not answer
ends at once instead of after ``startup_timeout``.

Servers decide what a signal means, and most only act on it after startup: uvicorn notes it and waits for
the lifespan startup, hypercorn too. The middleware chains its handler in front of whatever is installed
(the server's ``signal.signal`` handler, or asyncio's, which dispatches through the wakeup fd either way),
only during startup, and calls the previous one first: the server still sees every signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

#: The signals that ask a server to stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def on_stop_signal(callback: Callable[[signal.Signals], None]) -> Iterator[None]:
    """Call ``callback(signal)`` in the running loop when SIGINT or SIGTERM arrives inside the block.

    Outside the main thread (where signals cannot be handled) this does nothing. A handler that is not a
    Python callable (the default action, ignored) is left alone: no server is listening to it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    active = True
    installed: dict[signal.Signals, tuple[Callable[[int, FrameType | None], Any], Any]] = {}

    def make(previous: Callable[[int, FrameType | None], Any]) -> Callable[[int, FrameType | None], Any]:
        def handler(signum: int, frame: FrameType | None) -> Any:
            result = previous(signum, frame)  # the server first: it decides what the signal means
            if active:
                loop.call_soon_threadsafe(callback, signal.Signals(signum))
            return result

        return handler

    for sig in STOP_SIGNALS:
        previous = signal.getsignal(sig)
        if callable(previous):
            handler = make(previous)
            signal.signal(sig, handler)
            installed[sig] = (handler, previous)
    try:
        yield
    finally:
        active = False
        for sig, (handler, previous) in installed.items():
            if signal.getsignal(sig) is handler:  # else someone chained after us: ours stays, inactive
                signal.signal(sig, previous)
