"""Driving the wrapped app's lifespan from inside the middleware's own lifespan conversation."""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from ..base.types import ASGIApp, Message, Scope

logger = logging.getLogger("asgi_dbpool")

Outcome = Literal["complete", "failed", "unsupported", "timeout", "not running"]


class InnerLifespan:
    """Runs ``app``'s lifespan in a task and speaks the server's side of the protocol to it.

    An app that raises or returns before answering ``lifespan.startup`` does not support the protocol
    (as uvicorn's ``lifespan="auto"`` judges it); the middleware's own startup and shutdown still run.
    """

    def __init__(self, app: ASGIApp, scope: Scope) -> None:
        self.app = app
        self.scope = scope
        self.task: asyncio.Task[None] | None = None
        self.startup: tuple[Outcome, str] | None = None
        self.shutdown_answer: tuple[Outcome, str] | None = None
        #: What the app raised after it failed its startup or its shutdown: the middleware raises it in turn,
        #: as the bare app would (test clients learn of a failed lifespan only from that exception).
        self.error: BaseException | None = None
        self._started = asyncio.Event()
        self._shutdown_requested = asyncio.Event()
        self._shutdown_answered = asyncio.Event()
        self._receives = 0

    async def start(self) -> tuple[Outcome, str]:
        """Send ``lifespan.startup``; return how the app answered."""
        self.task = asyncio.create_task(self._run(), name="asgi_dbpool: wrapped app lifespan")
        await self._started.wait()
        assert self.startup is not None
        return self.startup

    async def stop(self, seconds: float) -> tuple[Outcome, str]:
        """Send ``lifespan.shutdown`` and wait up to ``seconds`` for the answer and for the app to return."""
        if self.task is None or self.task.done() or self.startup is None or self.startup[0] != "complete":
            return ("not running", "")
        self._shutdown_requested.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(seconds, 0.0)
        try:
            async with asyncio.timeout_at(deadline):
                await self._shutdown_answered.wait()
                await asyncio.shield(self.task)
        except TimeoutError:
            self.cancel()
            return ("timeout", "the wrapped app's lifespan shutdown did not finish in time")
        except Exception:  # the task's own exception is judged in _run
            pass
        return self.shutdown_answer or ("complete", "")

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def _receive(self) -> Message:
        self._receives += 1
        if self._receives == 1:
            return {"type": "lifespan.startup"}
        if self._receives == 2:
            await self._shutdown_requested.wait()
            return {"type": "lifespan.shutdown"}
        await asyncio.Event().wait()  # the conversation is over; block like a server would
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(self, message: Message) -> None:
        kind = message.get("type")
        if kind in ("lifespan.startup.complete", "lifespan.startup.failed") and self.startup is None:
            self.startup = (
                ("complete", "") if kind.endswith("complete") else ("failed", str(message.get("message", "")))
            )
            self._started.set()
        elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed") and self.startup is not None:
            # Also accepted unasked: Starlette answers shutdown.failed when its lifespan task is cancelled.
            if self.shutdown_answer is None:
                failed = kind.endswith("failed")
                self.shutdown_answer = ("failed", str(message.get("message", ""))) if failed else ("complete", "")
                self._shutdown_answered.set()
        else:
            raise RuntimeError(f"unexpected lifespan message {kind!r} from the wrapped app at this point.")

    async def _run(self) -> None:
        try:
            await self.app(self.scope, self._receive, self._send)
        except Exception as exc:
            self._judge(exc)
        finally:
            startup = self.startup or ("unsupported", "it returned without answering lifespan.startup")
            self.startup = startup
            if startup[0] == "unsupported":
                logger.info("the wrapped app does not use the lifespan protocol (%s)", startup[1])
            self._started.set()
            if self._shutdown_requested.is_set() and self.shutdown_answer is None:
                self.shutdown_answer = ("complete", "")
            self._shutdown_answered.set()

    async def exited(self, seconds: float) -> BaseException | None:
        """After a failed startup: wait up to ``seconds`` for the app to return and give what it raised."""
        if self.task is not None and not self.task.done():
            await asyncio.wait([self.task], timeout=seconds)
        return self.error

    def _judge(self, exc: BaseException) -> None:
        summary = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        if self.startup is None:
            # Raising before reading the first message is how lifespan-less apps react to the scope; raising
            # after reading it is a startup that crashed.
            self.startup = ("failed", summary) if self._receives else ("unsupported", summary)
            if self._receives:
                self.error = exc
        elif self.startup[0] == "failed":  # Starlette sends startup.failed, then raises
            self.error = exc
        elif self._shutdown_requested.is_set() and (
            self.shutdown_answer is None or self.shutdown_answer[0] == "failed"
        ):
            self.shutdown_answer = self.shutdown_answer or ("failed", summary)
            self.error = exc
        elif self.startup[0] == "complete" and not self._shutdown_requested.is_set():
            logger.error("the wrapped app's lifespan raised while running", exc_info=exc)
        else:
            logger.debug("the wrapped app's lifespan raised after answering: %r", exc)
