"""In-flight HTTP requests and open WebSockets, counted so shutdown can drain and close them."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ._tracker import Unit, current_unit
from ._types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("asgi_dbpool")

#: Close code the middleware uses for WebSockets it closes at shutdown ("going away").
GOING_AWAY = 1001
#: Close codes that mean "the server is going away" (uvicorn closes with 1012 before lifespan.shutdown).
SHUTDOWN_CODES = frozenset({GOING_AWAY, 1012})


def ended_by_shutdown(exc: BaseException, close_code: int | None) -> bool:
    """A handler's ``*Disconnect`` exception (Starlette, FastAPI, Litestar) after a server-shutdown close."""
    return close_code in SHUTDOWN_CODES and type(exc).__name__.endswith("Disconnect")


class _WebSocket:
    """One accepted WebSocket: the server's ``send`` and a way to interrupt the handler's ``receive``."""

    __slots__ = ("close_code", "closed", "closed_by_shutdown", "done", "interrupt", "pending", "send")

    def __init__(self, send: Send) -> None:
        self.send = send
        # The server's receive() in flight; kept across calls so a cancelled receive loses no message.
        self.pending: asyncio.Future[Message] | None = None
        self.close_code: int | None = None
        self.closed = False
        self.closed_by_shutdown = False
        self.interrupt: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done = asyncio.Event()


class ConnectionTracker:
    """Wraps each HTTP and WebSocket call of the app; knows what is still running."""

    def __init__(self) -> None:
        self.http_in_flight = 0
        self._http_idle = asyncio.Event()
        self._http_idle.set()
        self.websockets: set[_WebSocket] = set()

    async def http(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        self.http_in_flight += 1
        self._http_idle.clear()
        unit = Unit()
        token = current_unit.set(unit)
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await app(scope, receive, tracked_send)
        except asyncio.CancelledError:
            # Only a server cancels a request task: its graceful-shutdown timeout ran out, or it is force-exiting.
            # Answer instead of letting the server print a traceback and send 500 (or reset the connection).
            if started or unit.task is None:
                raise
            unit.task.uncancel()
            await _answer_cancelled(scope, send, unit.committed)
        finally:
            unit.done = True
            current_unit.reset(token)
            self.http_in_flight -= 1
            if not self.http_in_flight:
                self._http_idle.set()

    async def wait_http(self) -> None:
        """Return when no HTTP request is in flight."""
        await self._http_idle.wait()

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
            if ws is None or ws.closed:
                return await receive() if ws is None or not ws.closed_by_shutdown else _disconnect()
            if ws.pending is None:
                ws.pending = asyncio.ensure_future(receive())
            pending = ws.pending
            await asyncio.wait((pending, ws.interrupt), return_when=asyncio.FIRST_COMPLETED)
            if pending.done():
                ws.pending = None
                message = pending.result()
                if message["type"] == "websocket.disconnect":
                    ws.closed = True
                    ws.close_code = message.get("code", 1005)
                return message
            pending.cancel()
            return _disconnect()

        unit = Unit()
        token = current_unit.set(unit)
        try:
            await app(scope, tracked_receive, tracked_send)
        except Exception as exc:
            if ws is None or not (ws.closed_by_shutdown or ended_by_shutdown(exc, ws.close_code)):
                raise
            # The handler only failed because shutdown closed its socket (e.g. WebSocketDisconnect(1012)).
            logger.debug("asgi_dbpool: WebSocket handler ended by shutdown with %r", exc)
        finally:
            unit.done = True
            current_unit.reset(token)
            if ws is not None:
                if ws.pending is not None:
                    ws.pending.cancel()
                self.websockets.discard(ws)
                ws.done.set()

    async def close_websockets(self) -> tuple[int, list[asyncio.Event]]:
        """Close every open WebSocket with 1001 (idempotent) and interrupt its handler's ``receive``.

        Returns how many were closed here and the events that are set once each handler returned.
        """
        closed = 0
        waits = []
        for ws in list(self.websockets):
            ws.closed_by_shutdown = True
            waits.append(ws.done)
            if not ws.closed:
                ws.closed = True
                try:
                    await ws.send({"type": "websocket.close", "code": GOING_AWAY, "reason": "server shutting down"})
                    closed += 1
                except Exception as exc:  # the server closed it first (uvicorn does, with 1012)
                    logger.debug("asgi_dbpool: WebSocket already closed by the server: %r", exc)
            if not ws.interrupt.done():
                ws.interrupt.set_result(None)
        return closed, waits


async def _answer_cancelled(scope: Scope, send: Send, committed: bool) -> None:
    """503 + Retry-After when nothing was committed (its transactions rolled back: safe to retry); 500 without
    Retry-After when a COMMIT was sent, since its changes may have been saved (a retry could apply them twice)."""
    method, path = scope.get("method"), scope.get("path")
    if committed:
        status, retry = 500, []
        body = b'{"detail":"the server shut down while answering, after a commit: the changes may be saved"}'
        logger.warning("asgi_dbpool: %s %s was cancelled by the server after it committed; answering 500", method, path)
    else:
        status, retry = 503, [(b"retry-after", b"1")]
        body = b'{"detail":"the server is shutting down; nothing was committed"}'
        logger.warning(
            "asgi_dbpool: %s %s was cancelled by the server (shutting down) before it answered; answering 503",
            method,
            path,
        )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *retry,
    ]
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    except Exception as exc:  # the server already dropped the connection
        logger.debug("asgi_dbpool: could not answer the cancelled request: %r", exc)


def _disconnect() -> dict[str, Any]:
    return {"type": "websocket.disconnect", "code": GOING_AWAY}
