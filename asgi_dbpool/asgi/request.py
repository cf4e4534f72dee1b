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

    Made for every request, so it is kept to five stores (:meth:`start`): the scope, the server's ``send``, and
    the fields every request or checkout reads or writes (``done``, ``holding``, ``responded``). CPython
    specialises the load of an attribute the instance holds, not of one it reads from its class (3.11), nor a
    load or store of one that shadows a class attribute (3.12, 3.13): each of those is a full type lookup. The
    rest start as class attributes, read only on rarer paths (no ``__slots__``: an instance reads a field it
    never wrote from its class; the middleware's ``retry_after`` is one of a subclass per middleware, see
    :meth:`for_retry_after`); :meth:`send` is the app's ``send``.
    """

    # Written by start for every record (see above): never read from the class.
    done: bool
    holding: int  # connections checked out for it right now
    responded: bool  # the whole response went out
    committed = answered = False
    exhausted: Any = None  # the PoolTracker whose checkout timed out or was refused (set by exhaust)
    # Its task, noted only when it ends still holding a connection (the one thing that needs it, a leak
    # check, compares it with the holder's task): asking for the task on every request costs more.
    task: asyncio.Task[Any] | None = None
    retry_after = 1
    scope: Any  # the app fills in its route as it routes
    server_send: Any  # where send passes messages: the server's send, or _send_overloaded once exhausted
    to_server: Any  # the server's send, once server_send is _send_overloaded

    @classmethod
    def for_retry_after(cls, retry_after: int) -> type[InFlight]:
        """The record class of a middleware answering ``Retry-After: retry_after``: a store less per request."""
        return type(cls.__name__, (cls,), {"retry_after": retry_after, "__module__": cls.__module__})

    @classmethod
    def start(cls, scope: Any, server_send: Any) -> InFlight:
        """A request in flight. (The middleware's HTTP path makes it inline: a class without ``__init__`` and
        five stores cost less than a call to an ``__init__``.)"""
        request = cls()
        request.scope = scope
        request.server_send = server_send
        request.done = request.responded = False
        request.holding = 0
        return request

    def send(self, message: Any) -> Any:
        """The app's ``send``: notes the end of the response, and passes the message on (see :meth:`exhaust`)."""
        # "in" before the lookup: a final body message usually has no "more_body" (a method call saved).
        if message["type"] == "http.response.body" and not ("more_body" in message and message["more_body"]):  # noqa: RUF019
            self.responded = True  # a commit after this one was acknowledged too early (see on_session_commit)
        server_send = self.server_send  # an attribute load, which CPython 3.11 specialises (see start)
        return server_send(message)

    def exhaust(self, tracker: Any) -> None:
        """A checkout from ``tracker``'s pool timed out or was refused: the request's error becomes a 503, and so
        does the app's own 500 (from now on :meth:`send` passes messages through :meth:`_send_overloaded`)."""
        if self.exhausted is None:
            self.to_server = self.server_send
            self.server_send = self._send_overloaded
        self.exhausted = tracker

    async def _send_overloaded(self, message: Any) -> None:
        kind = message["type"]
        if kind == "http.response.start" and message.get("status") == 500 and not self.answered:
            self.answered = True
            self.exhausted.overload_answers += 1
            await respond(self.to_server, 503, POOL_EXHAUSTED, retry_after=self.retry_after, close=False)
        elif not (self.answered and kind == "http.response.body"):
            await self.to_server(message)

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
#: Its methods bound once, for the hot paths (see :data:`~asgi_dbpool.pool.checkout.get_current_request`).
get_request = current_request.get
set_request = current_request.set
reset_request = current_request.reset
