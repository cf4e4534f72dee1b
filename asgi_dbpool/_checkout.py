"""Who holds a connection: the request in flight, the owner task and the checkout site of every checkout."""

from __future__ import annotations

import asyncio
import logging
import sys
from contextvars import ContextVar
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

from greenlet import getcurrent
from sqlalchemy.orm import Session

from ._records import fields
from ._respond import POOL_EXHAUSTED, respond
from ._types import STATE_KEY

if TYPE_CHECKING:
    from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

logger = logging.getLogger("asgi_dbpool")

# Frames from these places are not "the code that checked the connection out".
_INTERNAL_PARTS = (
    "/sqlalchemy/",
    "/asyncpg/",
    "/asyncio/",
    "/greenlet/",
    "/asgi_dbpool/",
    "/contextlib.py",
    # the installed frameworks and servers between a request and its endpoint (site- or dist-packages)
    "-packages/starlette/",
    "-packages/fastapi/",
    "-packages/litestar/",
    "-packages/anyio/",
    "-packages/uvicorn/",
    "-packages/hypercorn/",
)
_internal_cache: dict[str, bool] = {}


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


#: The request or WebSocket being served in this context, set by the middleware for each call and reset when the
#: call ends: a wrapped sub-app called from a wrapped app in the same task gives the outer request back.
current_request: ContextVar[InFlight | None] = ContextVar("asgi_dbpool_request", default=None)


def on_session_commit(session: Session) -> None:
    """Mark the request as having tried a COMMIT (before it is sent: a cut-off COMMIT may have landed).

    An ORM event, not a Core ``ConnectionEvents.commit`` listener: a Core listener on the engine switches on
    event dispatch for every statement (about 2% end to end here). Commits through ``AsyncConnection`` /
    ``engine.begin()`` directly are therefore not seen.
    """
    request = current_request.get()
    if request is not None and not request.done:
        request.committed = True
        # A COMMIT that matters: a transaction holds a connection, or the flush in this commit writes changes.
        if request.responded and (request.holding or session.new or session.dirty or session.deleted):
            state = request.scope.get("state")
            late = getattr(state.get(STATE_KEY) if state else None, "late_commits", None)
            if late is not None and not _in_background_task():
                late.note(request)


#: Where the frameworks run a response's background tasks (after the response, by design).
BACKGROUND_TASK_FILES = ("/starlette/background.py", "/litestar/background_tasks.py")


def _in_background_task() -> bool:
    """Whether this commit runs in a background task of the response (FastAPI's ``BackgroundTasks``, Starlette's,
    Litestar's): started after the response by design, not a commit the client was told about. Read only for a
    commit after the response: a walk of the caller's frames."""
    glet: Any = getcurrent()
    frame: FrameType | None = sys._getframe(1)
    while True:  # across greenlets: the ORM's commit runs in one SQLAlchemy spawned under the awaiting code
        while frame is not None:
            if frame.f_code.co_filename.endswith(BACKGROUND_TASK_FILES):
                return True
            frame = frame.f_back
        glet = glet.parent
        if glet is None:
            return False
        frame = glet.gr_frame


class LateCommits:
    """One app's ORM commits that started after their request's response had gone out, per route template
    (``METHOD /items/{item_id}``): a request with no template (raw ASGI, a 404) and routes past
    :attr:`MAX_ROUTES` count as ``other``, so the labels stay bounded whatever the paths. One WARNING per route."""

    MAX_ROUTES = 100
    OTHER = "other"

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def note(self, request: InFlight) -> None:
        route = request.route_template() or self.OTHER
        counts = self.counts
        if route not in counts and len(counts) >= self.MAX_ROUTES:
            route = self.OTHER
        first = route not in counts
        counts[route] = counts.get(route, 0) + 1
        if first:
            logger.warning(
                "%s: an ORM commit started after the response was sent: the client was told it succeeded before "
                "the COMMIT, which can still fail or be cut by a shutdown (FastAPI runs the code after `yield` in "
                "a dependency once the response is out). Commit in the endpoint, or declare the dependency with "
                'Depends(..., scope="function")',
                route,
                extra=fields("late_commit", route=route),
            )


def _is_internal(filename: str) -> bool:
    try:
        return _internal_cache[filename]
    except KeyError:
        # "<...>" names generated code (SQLAlchemy decorators, frozen modules), never the caller.
        internal = filename.startswith("<") or any(part in filename for part in _INTERNAL_PARTS)
        _internal_cache[filename] = internal
        return internal


#: How many of the user's frames a checkout records (the innermost first): enough to get from a shared helper
#: (a decorator, a repository function) to the endpoint that called it.
SITE_FRAMES = 3
#: After the first user frame, how many more frames the walk looks at for its callers (a helper's caller, or
#: one decorator between them): past the endpoint lie the framework's and the server's frames, and each frame
#: walked costs about 1.5 k instructions per checkout (Python makes a frame object for it).
CALLER_REACH = 2

#: A frame as a checkout records it: its code and the offset of its current instruction. The line number is
#: worked out only when a report asks (``frame.f_lineno`` decodes the line table: the costliest part of a walk).
Frame = tuple[CodeType, int]
#: With leak detection on, how many user frames a checkout records for the report, and how far past the first
#: one the walk goes (it stops at the step of the task in any case).
STACK_FRAMES = 12
STACK_REACH = 64


#: The frame that runs one step of an asyncio task: above it lie the event loop's frames, never a caller.
TASK_STEP = asyncio.events.Handle._run.__code__


def _user_frames(limit: int, reach: int) -> list[Frame]:
    """The caller's innermost frames outside SQLAlchemy/asyncpg/asyncio/the frameworks (up to ``limit``; past the
    first, ``reach`` more frames are looked at; never past the step of the task), across greenlet boundaries.

    With the asyncio engine the checkout runs in a greenlet spawned by SQLAlchemy whose frames are all
    SQLAlchemy's (or a ``run_sync`` callable's): the walk starts in the awaiting (parent) greenlet, a few
    frames below the user's ``await``. Run on every checkout: each frame walked makes Python build a frame
    object, so the loop is kept flat and stops as early as it can.
    """
    glet: Any = getcurrent()
    parent = glet.parent
    if parent is not None:
        glet = parent
        frame: FrameType | None = parent.gr_frame
    else:
        frame = sys._getframe(1)
    cache = _internal_cache
    found: list[Frame] = []
    left = -1  # frames still to look at once the first user frame is found
    while True:
        while frame is not None:
            code = frame.f_code
            try:
                internal = cache[code.co_filename]
            except KeyError:
                internal = _is_internal(code.co_filename)
            if not internal:
                found.append((code, frame.f_lasti))
                if len(found) == limit:
                    return found
                if left < 0:
                    left = reach
            elif code is TASK_STEP:
                return found
            if left == 0:
                return found
            left -= 1
            frame = frame.f_back
        glet = glet.parent
        if glet is None:
            return found
        frame = glet.gr_frame


def checkout_frames(stack: bool) -> tuple[tuple[Frame, ...], tuple[Frame, ...] | None]:
    """The checkout site (up to :data:`SITE_FRAMES` user frames, innermost first) and, with ``stack`` (leak
    detection on), the stack (up to :data:`STACK_FRAMES`): then one walk gives both, the site being its first
    frames."""
    if not stack:
        return tuple(_user_frames(SITE_FRAMES, CALLER_REACH)), None
    frames = tuple(_user_frames(STACK_FRAMES, STACK_REACH))
    return frames[:SITE_FRAMES], frames


def line_of(code: CodeType, offset: int) -> int:
    """The line of the instruction at ``offset`` (what ``frame.f_lineno`` said when the frame was there)."""
    for start, end, line in code.co_lines():
        if start <= offset < end and line is not None:
            return line
    return code.co_firstlineno


def current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # a sync engine used from a worker thread
        return None


#: What the pool notes per checkout, in the order of :class:`Checkout`'s fields: a plain tuple is the cheapest
#: record to make (a class instance costs a Python ``__init__`` call); reports read it through ``Checkout``.
Held = tuple[
    "ConnectionPoolEntry",
    "asyncio.Task[Any] | None",
    tuple[Frame, ...],
    "InFlight | None",
    "tuple[Frame, ...] | None",
    float,
]


class Checkout:
    """One connection that is checked out right now, as reports, leak checks and shutdown read it."""

    __slots__ = ("frames", "owner", "record", "reported", "request", "since", "stack_frames")

    def __init__(self, held: Held, reported: bool) -> None:
        # owner: kept until checkin (a finished task that leaked stays inspectable); since: time.perf_counter();
        # stack_frames: only with leak detection on.
        self.record, self.owner, self.frames, self.request, self.stack_frames, self.since = held
        self.reported = reported  # a leak WARNING named it already

    @property
    def where(self) -> tuple[tuple[str, int], ...]:
        """``(file, line)`` of the user's frames of the checkout, innermost first."""
        return tuple((code.co_filename, line_of(code, offset)) for code, offset in self.frames) or (("<unknown>", 0),)

    @property
    def stack(self) -> list[str] | None:
        """The checkout's user frames as ``file:line in function`` (with leak detection on; else None)."""
        if self.stack_frames is None:
            return None
        return [f"{code.co_filename}:{line_of(code, offset)} in {code.co_name}" for code, offset in self.stack_frames]

    def proxy(self) -> PoolProxiedConnection | None:
        """The connection as its holder sees it (SQLAlchemy's checkout made it, after the pool gave the record)."""
        fairy_ref = getattr(self.record, "fairy_ref", None)
        return fairy_ref() if fairy_ref is not None else None

    def is_leak(self, current: asyncio.Task[Any] | None) -> bool:
        """True when nobody is working with this connection any more (its holder moved on or ended).

        A request's task may live on after the request (an in-process client, a test): once the request
        finished, a connection its task still holds was leaked. A task spawned from the request is judged
        by itself: still running means still working.
        """
        owner = self.owner
        if owner is None or owner.done() or owner is current:
            return True
        request = self.request
        return request is not None and request.done and request.task is owner

    @property
    def site(self) -> str:
        """The innermost user frame of the checkout, ``file:line``."""
        file, line = self.where[0]
        return f"{file}:{line}"

    def context(self) -> str:
        """`` (called from f:1 < g:2) during POST /route``: the next user frames and the request, where known."""
        callers = " < ".join(f"{file}:{line}" for file, line in self.where[1:])
        request = self.request
        return (f" (called from {callers})" if callers else "") + (
            f" during {request.route()}" if request is not None else ""
        )

    def describe(self, now: float) -> str:
        owner = self.owner
        who = "no task" if owner is None else f"task {owner.get_name()!r}" + (" (finished)" if owner.done() else "")
        return f"checked out at {self.site} {now - self.since:.1f}s ago by {who}{self.context()}"
