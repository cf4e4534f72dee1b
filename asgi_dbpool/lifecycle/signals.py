"""Hearing the stop signals (SIGINT, SIGTERM) without owning them, and holding SIGTERM where nothing handles it.

Servers decide what a signal means, and most only act on it after startup: uvicorn notes it and waits for the
lifespan startup, hypercorn too. The middleware listens (a startup that waits on a database that does not answer
ends at once; a request the server cancels after a signal is answered cleanly) through one handler per signal for
the whole process, put in front of whatever was installed (the server's ``signal.signal`` handler, or asyncio's,
which dispatches through the wakeup fd either way) while anyone listens; every signal still reaches that
previous handler. A signal whose handler is ignored, or the default action, is left alone: no server listens to
it, except that SIGTERM with its default action is *held* (see :class:`DeferredTermination`).

Process-wide by nature: a signal has one handler per process. Every app of the process shares that one
handler, so none of them hides the signal from another, and removing it restores what was there before.
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

Listener = tuple[asyncio.AbstractEventLoop, Callable[[signal.Signals], None]]


class _Hub:
    """The process's one handler of ``sig``, while it has listeners or holders."""

    def __init__(self, sig: signal.Signals) -> None:
        self.sig = sig
        self.previous: Any = None  # the disposition before ours (called for every signal, unless held)
        self.installed = False
        self.listeners: dict[object, Listener] = {}
        self.holders: set[object] = set()  # SIGTERM with its default action: held until the last lets go
        self.held = False  # a held SIGTERM came

    def install(self) -> bool:
        """Put the handler in place if it is not; False where the signal is ignored or has its default action
        (SIGTERM's default is taken over only by :meth:`hold`)."""
        if self.installed:
            return True
        previous = signal.getsignal(self.sig)
        if not callable(previous):
            return False
        self.previous = previous
        signal.signal(self.sig, _handler)
        self.installed = True
        return True

    def uninstall_if_unused(self) -> None:
        if self.listeners or self.holders or not self.installed:
            return
        if signal.getsignal(self.sig) is _handler:  # else someone chained after us: ours stays, passing through
            signal.signal(self.sig, self.previous)
            self.installed = False

    def dispatch(self, signum: int, frame: FrameType | None) -> Any:
        for loop, callback in list(self.listeners.values()):
            with contextlib.suppress(RuntimeError):  # that listener's loop is closed: it has nothing to run
                loop.call_soon_threadsafe(callback, self.sig)
        if self.holders and self.previous is signal.SIG_DFL:
            self.held = True  # the last holder to let go ends the process by it
            return None
        if callable(self.previous):
            return self.previous(signum, frame)  # the server still sees every signal
        if self.previous is signal.SIG_DFL:  # held no longer (a stale handler): act as the default would
            signal.signal(self.sig, signal.SIG_DFL)
            signal.raise_signal(self.sig)
        return None


_hubs = {sig: _Hub(sig) for sig in STOP_SIGNALS}


def _handler(signum: int, frame: FrameType | None) -> Any:
    return _hubs[signal.Signals(signum)].dispatch(signum, frame)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def on_stop_signal(callback: Callable[[signal.Signals], None]) -> Iterator[None]:
    """Call ``callback(signal)`` in the running loop when SIGINT or SIGTERM arrives inside the block.

    Outside the main thread (where signals cannot be handled) this does nothing; so for a signal that is ignored
    or has its default action (no server is listening to it), unless SIGTERM is held.
    """
    if not _in_main_thread():
        yield
        return
    key = object()
    listener = (asyncio.get_running_loop(), callback)
    for hub in _hubs.values():
        if hub.install():
            hub.listeners[key] = listener
    try:
        yield
    finally:
        for hub in _hubs.values():
            if hub.listeners.pop(key, None) is not None:
                hub.uninstall_if_unused()


class DeferredTermination:
    """SIGTERM that nothing handles ends the process at once (its default action): a hypercorn worker, whose
    master sends it to the workers still running as soon as one worker exited, dies mid-startup or mid-drain with
    its connections open. Where SIGTERM has that default, each lifecycle holds it for as long as it owns
    connections: :meth:`install` takes the signal over (one handler for the process) and calls ``callback`` in
    the loop when it comes; :meth:`release` lets go. When the last holder of the process let go, the default is
    put back and, if the signal came, raised again: the process still ends by SIGTERM, only after every app that
    held it closed what it opened and answered its server. A disposition anyone else chose (a server's handler,
    ignored) is left alone: the signal is theirs.
    """

    def __init__(self) -> None:
        self.holding = False
        self.received = False

    def install(self, callback: Callable[[], None]) -> None:
        hub = _hubs[signal.SIGTERM]
        if self.holding or not _in_main_thread():
            return
        if hub.installed:
            if hub.previous is not signal.SIG_DFL:  # a server's handler: the signal is theirs
                return
        elif signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            hub.previous, hub.held = signal.SIG_DFL, False
            signal.signal(signal.SIGTERM, _handler)
            hub.installed = True
        else:
            return
        self.holding, self.received = True, False

        def deliver(sig: signal.Signals) -> None:
            if not self.received:  # one is being handled; the lifecycle's own deadlines bound it
                self.received = True
                callback()

        hub.holders.add(self)
        hub.listeners[self] = (asyncio.get_running_loop(), deliver)

    def release(self) -> None:
        """Let go; the last holder of the process puts the default back and ends the process by SIGTERM now if
        one was held."""
        if not self.holding:
            return
        self.holding = False
        hub = _hubs[signal.SIGTERM]
        hub.holders.discard(self)
        hub.listeners.pop(self, None)
        if hub.holders:
            return
        if hub.held:
            hub.held = False
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
            return  # pragma: no cover - the process ended
        hub.uninstall_if_unused()


@contextlib.contextmanager
def noting_stop_signals(note: Callable[[], None]) -> Iterator[None]:
    """While the app runs, hear SIGINT and SIGTERM where a server handles them (its Python handler, or asyncio's)
    or where SIGTERM is held: ``note()`` runs in the loop; the server's handler still runs."""
    with on_stop_signal(lambda sig: note()):
        yield
