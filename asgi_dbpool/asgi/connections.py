"""In-flight HTTP requests and open WebSockets, counted so shutdown can drain and close them.

Counting is on the per-request hot path, so it keeps to counters; waiting is set up only when shutdown asks.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from types import FrameType
from typing import Any

from ..base.records import fields
from ..base.types import ASGIApp, Message, Receive, Scope, Send
from ..lifecycle.shutdown import CLOSE_FRAME_TIMEOUT
from ..pool.checkout import TASK_STEP, current_task
from .request import InFlight, reset_request, set_request
from .responses import SHUT_AFTER_COMMIT, SHUTTING_DOWN, respond

logger = logging.getLogger("asgi_dbpool")

#: Close code the middleware uses for WebSockets it closes at shutdown ("going away").
GOING_AWAY = 1001
#: Close code for WebSockets closed when the server begins to stop, before lifespan.shutdown ("service
#: restart", as uvicorn closes them).
SERVICE_RESTART = 1012
#: Close codes that mean "the server is going away".
SHUTDOWN_CODES = frozenset({GOING_AWAY, SERVICE_RESTART})


def ended_by_shutdown(exc: BaseException, close_code: int | None) -> bool:
    """A handler's ``*Disconnect`` exception (Starlette, FastAPI, Litestar) after a server-shutdown close."""
    return close_code in SHUTDOWN_CODES and type(exc).__name__.endswith("Disconnect")


class _WebSocket:
    """One accepted WebSocket: the server's ``send`` and a way to interrupt the handler's ``receive``."""

    __slots__ = ("close_code", "closed", "closed_by_shutdown", "interrupt", "pending", "send")

    def __init__(self, send: Send) -> None:
        self.send = send
        # The server's receive() in flight; kept across calls so a cancelled receive loses no message.
        self.pending: asyncio.Future[Message] | None = None
        self.interrupt: asyncio.Future[None] | None = None  # made when a receive has to be raced
        self.close_code: int | None = None
        self.closed = False
        self.closed_by_shutdown = False


class ConnectionTracker:
    """Counts HTTP requests in flight and keeps the accepted WebSockets whose handlers still run."""

    def __init__(self) -> None:
        self.http_in_flight = 0
        self.websockets: set[_WebSocket] = set()
        # WebSockets the server closed for its own shutdown (1012, as uvicorn does before lifespan.shutdown).
        self.closed_by_server = 0
        self.drain_waiter: asyncio.Future[None] | None = None  # made by wait_http, when shutdown drains
        # Someone wants to hear of each request's end (the lifecycle's request_ended): the shutdown's drain, or
        # requests served without a lifespan. One test on the hot path for both.
        self.watched = False
        self._ws_waiter: asyncio.Future[None] | None = None

    def http_done(self) -> None:
        """A request ended while shutdown drains (the middleware has counted it out already)."""
        if not self.http_in_flight and self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    async def wait_http(self) -> None:
        """Return when no HTTP request is in flight."""
        while self.http_in_flight:
            self.watched = True
            self.drain_waiter = asyncio.get_running_loop().create_future()
            await self.drain_waiter

    async def wait_websockets(self) -> None:
        """Return when every accepted WebSocket's handler has returned."""
        while self.websockets:
            self._ws_waiter = asyncio.get_running_loop().create_future()
            await self._ws_waiter

    async def websocket(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        ws: _WebSocket | None = None

        async def tracked_send(message: Message) -> None:
            nonlocal ws
            kind = message["type"]
            if kind == "websocket.accept" and ws is None:
                await send(message)
                ws = _WebSocket(send)
                self.websockets.add(ws)
                return
            if ws is not None and kind == "websocket.close":
                if ws.closed:  # the middleware closed it already: closing is idempotent
                    return
                ws.closed = True
            await send(message)

        async def tracked_receive() -> Message:
            if ws is None:
                return await receive()
            if ws.closed_by_shutdown:
                return _disconnect(ws.close_code)
            if ws.pending is None:
                ws.pending = asyncio.ensure_future(receive())
            pending = ws.pending
            if ws.interrupt is None:
                ws.interrupt = asyncio.get_running_loop().create_future()
            await asyncio.wait((pending, ws.interrupt), return_when=asyncio.FIRST_COMPLETED)
            if not pending.done():
                # Shutdown closed the socket; the pending receive is cancelled at the end.
                return _disconnect(ws.close_code)
            ws.pending = None
            message = pending.result()
            if message["type"] == "websocket.disconnect":
                ws.closed = True
                ws.close_code = message.get("code", 1005)
                if ws.close_code == SERVICE_RESTART:
                    self.closed_by_server += 1
            return message

        request = InFlight.start(scope, send)
        token = set_request(request)
        try:
            await app(scope, tracked_receive, tracked_send)
        except Exception as exc:
            if ws is None or not (ws.closed_by_shutdown or ended_by_shutdown(exc, ws.close_code)):
                raise
            # The handler only failed because shutdown closed its socket (e.g. WebSocketDisconnect(1012)).
            logger.debug("WebSocket handler ended by shutdown with %r", exc)
        finally:
            request.done = True
            if request.holding:  # it leaves connections behind: a leak check compares their task with its own
                request.task = current_task()
            reset_request(token)
            if ws is not None:
                if ws.pending is not None:
                    ws.pending.cancel()
                self.websockets.discard(ws)
                if not self.websockets and self._ws_waiter is not None and not self._ws_waiter.done():
                    self._ws_waiter.set_result(None)

    async def close_websockets(self, deadline: float, code: int = GOING_AWAY) -> tuple[int, int]:
        """Close every open WebSocket with ``code`` (idempotent) and interrupt its handler's ``receive``.

        All at once, each close bounded by :data:`CLOSE_FRAME_TIMEOUT` and ``deadline`` (loop time): a server that
        does not take the close frame (granian, mid-shutdown, can leave it pending) holds up neither the other
        sockets nor the drain, and the handler is interrupted either way. Returns (closed here, close frames the
        server had not taken in time); the others had been closed by the server or the app.
        """
        sockets = list(self.websockets)
        for ws in sockets:
            ws.closed_by_shutdown = True
            ws.close_code = ws.close_code or code
        outcomes = await asyncio.gather(*(self._close(ws, deadline, code) for ws in sockets))
        return outcomes.count("closed"), outcomes.count("pending")

    @staticmethod
    async def _close(ws: _WebSocket, deadline: float, code: int) -> str:
        outcome = "already closed"
        try:
            if not ws.closed:
                ws.closed = True
                give_up = min(deadline, asyncio.get_running_loop().time() + CLOSE_FRAME_TIMEOUT)
                async with asyncio.timeout_at(give_up):
                    await ws.send({"type": "websocket.close", "code": code, "reason": "server shutting down"})
                outcome = "closed"
        except TimeoutError:
            outcome = "pending"
        except Exception as exc:  # the server closed it first (uvicorn does, with 1012)
            logger.debug("WebSocket already closed by the server: %r", exc)
        finally:
            if ws.interrupt is not None and not ws.interrupt.done():
                ws.interrupt.set_result(None)
        return outcome


#: Where the code that may call the middleware without expecting its cancellation lives: servers, the frameworks
#: between a server and the middleware, asyncio and anyio, and the middleware itself.
SERVER_SIDE = (
    "/asgi_dbpool/",
    "/asyncio/",
    "-packages/anyio/",
    "-packages/uvicorn/",
    "-packages/uvicorn_worker/",
    "-packages/hypercorn/",
    "-packages/granian/",
    "-packages/gunicorn/",
    "-packages/starlette/",
    "-packages/fastapi/",
    "-packages/litestar/",
)


def cancelled_by_server() -> bool:
    """A request's cancellation, when no stop was heard (hypercorn's worker hears no signal: its master tells it
    through a shared event), or the running lifespan's, is the server's when nothing above the middleware in the
    task is anyone else's code:
    a timeout, a task group or an outer middleware of the app's or a test's is in a frame of theirs, and it is
    theirs to handle. Read only on a cancellation: a walk of the caller's frames."""
    frame: FrameType | None = sys._getframe(2)  # the middleware's caller
    while frame is not None and frame.f_code is not TASK_STEP:  # above the task's step: the event loop's frames
        filename = frame.f_code.co_filename
        if not any(part in filename for part in SERVER_SIDE):
            return False
        frame = frame.f_back
    return True


async def answer_cancelled(scope: Scope, send: Send, request: InFlight, retry_after: int) -> None:
    """Answer a request the server cancelled while stopping, or end it quietly when its response had started.

    503 + Retry-After when nothing was committed (its transactions rolled back: safe to retry); 500 without
    Retry-After when a COMMIT was sent, since its changes may have been saved (a retry could apply them twice).
    A response that had started cannot be answered again: the request ends without raising, since a server prints
    whatever escapes as a traceback (uvicorn's ``Exception in ASGI application``); a response cut in the middle is
    then closed by the server (uvicorn logs one line, ``ASGI callable returned without completing response``).
    """
    method, path = scope.get("method"), scope.get("path")
    if request.responded:  # the whole response went out (FastAPI's dependency teardown, a background step)
        logger.info(
            "%s %s was cancelled by the server (shutting down) after its response went out%s",
            method,
            path,
            "; it had begun a commit" if request.committed else "",
            extra=fields("cancelled", method=method, path=path, committed=request.committed, responded=True),
        )
        return
    if request.committed:
        answered = await respond(send, 500, SHUT_AFTER_COMMIT, retry_after=None, close=True)
    else:
        answered = await respond(send, 503, SHUTTING_DOWN, retry_after=retry_after, close=True)
    extra = fields("cancelled", method=method, path=path, committed=request.committed, responded=False)
    if not answered:
        logger.warning(
            "%s %s was cancelled by the server (shutting down) in the middle of its response; the client gets it cut",
            method,
            path,
            extra=extra,
        )
    elif request.committed:
        logger.warning("%s %s was cancelled by the server after it committed; answering 500", method, path, extra=extra)
    else:
        logger.warning(
            "%s %s was cancelled by the server (shutting down) before it answered; answering 503",
            method,
            path,
            extra=extra,
        )


def _disconnect(code: int | None) -> dict[str, Any]:
    return {"type": "websocket.disconnect", "code": code or GOING_AWAY}
