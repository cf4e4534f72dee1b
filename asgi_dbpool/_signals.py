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


@contextlib.contextmanager
def noting_stop_signals(note: Callable[[], None]) -> Iterator[None]:
    """While the app runs, hear SIGINT and SIGTERM where a server handles them (its Python handler, or asyncio's):
    ``note()`` runs in the loop, and the server's handler still runs, first. Nothing is owned: a signal whose
    handler is the default action or ignored is left alone, as in :func:`on_stop_signal`."""
    with on_stop_signal(lambda sig: note()):
        yield


class DeferredTermination:
    """SIGTERM that nothing handles ends the process at once (its default action): a hypercorn worker, whose
    master sends it to the workers still running as soon as one worker exited, dies mid-startup or mid-drain with
    its connections open. Where SIGTERM has that default, the lifecycle holds it for as long as it owns
    connections: :meth:`install` puts a handler in its place that calls ``callback`` in the loop, and
    :meth:`release` puts the default back and, if the signal came, raises it again, so the process still ends by
    SIGTERM, only after what it opened was closed. A disposition anyone else chose (a server's handler, ignored)
    is left alone.
    """

    def __init__(self) -> None:
        self.handler: Callable[[int, FrameType | None], Any] | None = None
        self.received = False

    def install(self, callback: Callable[[], None]) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if self.handler is not None or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        loop = asyncio.get_running_loop()
        self.received = False

        def handler(signum: int, frame: FrameType | None) -> None:
            if self.received:  # one is being handled; the lifecycle's own deadlines bound it
                return
            self.received = True
            try:
                loop.call_soon_threadsafe(callback)
            except RuntimeError:  # the loop is closed: nothing of ours can run any more, end as the default would
                self.release()

        signal.signal(signal.SIGTERM, handler)
        self.handler = handler

    def release(self) -> None:
        """Put the default back; end the process by SIGTERM now if one was held."""
        handler, self.handler = self.handler, None
        if handler is None or signal.getsignal(signal.SIGTERM) is not handler:  # someone chained after us: theirs
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if self.received:
            signal.raise_signal(signal.SIGTERM)
