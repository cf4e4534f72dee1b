"""The request or WebSocket in flight through the middleware, and the context variable that holds it."""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Any, cast

from ..pool import checkout
from .responses import POOL_EXHAUSTED, respond


class InFlight:
    """One HTTP request or WebSocket in flight through the middleware: whether it has finished, whether it tried
    an ORM commit (then a request cut off by the server may have saved its changes), the pool that could not
    give it a connection (then its error becomes a 503), and the connections it holds.

    Made for every request, so it is kept to three stores (:meth:`start`): the rest starts as class attributes
    (no ``__slots__``: an instance reads a field it never wrote from its class); :meth:`send` is the app's ``send``.
    """

    done = committed = responded = answered = False  # responded: the whole response went out
    holding = 0  # connections checked out for it right now
    exhausted: Any = None  # the PoolTracker whose checkout timed out or was refused
    # Its task, noted only when it ends still holding a connection (the one thing that needs it, a leak
    # check, compares it with the holder's task): asking for the task on every request costs more.
    task: asyncio.Task[Any] | None = None
    scope: Any  # the app fills in its route as it routes
    server_send: Any
    retry_after: int

    @classmethod
    def start(cls, scope: Any, server_send: Any, retry_after: int) -> InFlight:
        """A request in flight. (The middleware's HTTP path makes it inline: a class without ``__init__`` and
        three stores cost half of a call to an ``__init__``.)"""
        request = cls()
        request.scope = scope
        request.server_send = server_send
        request.retry_after = retry_after
        return request

    def send(self, message: Any) -> Any:
        """The app's ``send``: notes the end of the response; after a pool timeout, the app's 500 becomes a 503."""
        # "in" before the lookup: a final body message usually has no "more_body" (a method call saved).
        if message["type"] == "http.response.body" and not ("more_body" in message and message["more_body"]):  # noqa: RUF019
            self.responded = True  # a commit after this one was acknowledged too early (see on_session_commit)
        if self.exhausted is None:
            return self.server_send(message)
        return self._send_overloaded(message)

    async def _send_overloaded(self, message: Any) -> None:
        kind = message["type"]
        if kind == "http.response.start" and message.get("status") == 500 and not self.answered:
            self.answered = True
            self.exhausted.overload_answers += 1
            await respond(self.server_send, 503, POOL_EXHAUSTED, retry_after=self.retry_after, close=False)
        elif not (self.answered and kind == "http.response.body"):
            await self.server_send(message)

    def route(self) -> str:
        """``METHOD /route/template`` (the matched route's path where the framework records it, else the path)."""
        scope = self.scope
        return f"{scope.get('method', 'WEBSOCKET')} {self._template() or scope.get('path', '?')}"

    def route_template(self) -> str | None:
        """``METHOD /route/template`` where the framework recorded the matched route (Starlette and FastAPI:
        ``scope["route"]``; Litestar: ``scope["path_template"]``), else None: never the raw path."""
        template = self._template()
        return f"{self.scope.get('method', 'WEBSOCKET')} {template}" if template else None

    def _template(self) -> str | None:
        scope = self.scope
        template = getattr(scope.get("route"), "path", None) or scope.get("path_template")
        return template if isinstance(template, str) and template else None


#: The pool layer's :data:`~asgi_dbpool.pool.checkout.current_request`, typed as what the middleware puts in it.
current_request = cast("ContextVar[InFlight | None]", checkout.current_request)
