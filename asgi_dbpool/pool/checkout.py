"""Who holds a connection: the request in flight, the owner task and the checkout site of every checkout."""

from __future__ import annotations

import asyncio
import sys
from contextvars import ContextVar
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any, Protocol

from greenlet import getcurrent

if TYPE_CHECKING:
    from sqlalchemy.pool import ConnectionPoolEntry

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


class Request(Protocol):
    """The request or WebSocket in flight as the pool layer reads and writes it (the ASGI layer's ``InFlight``):
    whether it has finished, how many connections it holds, the tracker of a pool that could not serve it, its task
    once it ended holding connections, and its route for reports."""

    done: bool
    holding: int
    exhausted: Any
    task: asyncio.Task[Any] | None

    def exhaust(self, tracker: Any) -> None: ...

    def route(self) -> str: ...


#: The request or WebSocket being served in this context, set by the middleware for each call and reset when the
#: call ends: a wrapped sub-app called from a wrapped app in the same task gives the outer request back.
current_request: ContextVar[Request | None] = ContextVar("asgi_dbpool_request", default=None)
#: ``current_request.get``, bound once for the hot paths: CPython 3.11 compiles a method call on an imported name as
#: an attribute load (it takes the name for a module's), which makes a bound method at every call.
get_current_request = current_request.get


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
    object, so the walk stops as early as it can, in two flat loops: up to the first user frame (most frames
    walked are SQLAlchemy's, each tested once), then the ``reach`` frames past it.
    """
    glet: Any = getcurrent()
    parent = glet.parent
    if parent is not None:
        glet = parent
        frame: FrameType | None = parent.gr_frame
    else:
        frame = sys._getframe(1)
    cache = _internal_cache
    while True:  # to the first user frame
        while frame is None:  # the end of a greenlet's frames: its parent's go on
            glet = glet.parent
            if glet is None:
                return []
            frame = glet.gr_frame
        code = frame.f_code
        try:
            internal = cache[code.co_filename]
        except KeyError:
            internal = _is_internal(code.co_filename)
        if not internal:
            break
        if code is TASK_STEP:
            return []
        frame = frame.f_back
    found = [(code, frame.f_lasti)]
    left = reach if limit > 1 else 0
    while left:  # its callers
        left -= 1
        frame = frame.f_back
        while frame is None:
            glet = glet.parent
            if glet is None:
                return found
            frame = glet.gr_frame
        code = frame.f_code
        try:
            internal = cache[code.co_filename]
        except KeyError:
            internal = _is_internal(code.co_filename)
        if not internal:
            found.append((code, frame.f_lasti))
            if len(found) == limit:
                return found
        elif code is TASK_STEP:
            return found
    return found


def checkout_frames(stack: bool) -> tuple[list[Frame], list[Frame] | None]:
    """The checkout site (up to :data:`SITE_FRAMES` user frames, innermost first) and, with ``stack`` (leak
    detection on), the stack (up to :data:`STACK_FRAMES`): then one walk gives both, the site being its first
    frames. Both are fresh lists that nothing changes later (a copy into a tuple would cost a call per checkout)."""
    if not stack:
        return _user_frames(SITE_FRAMES, CALLER_REACH), None
    frames = _user_frames(STACK_FRAMES, STACK_REACH)
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
    list[Frame],
    "Request | None",
    "list[Frame] | None",
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
        who = "no task" if owner is None else f"task {owner.get_name()!r}" + _ended(owner)
        return f"checked out at {self.site} {now - self.since:.1f}s ago by {who}{self.context()}"


def _ended(task: asyncio.Task[Any]) -> str:
    """How the holder ended, for the report: a task cancelled with the connection still checked out was cut before
    its cleanup ran (a forced exit's ``asyncio.run`` cancels every task at once, SQLAlchemy's close tasks too)."""
    if not task.done():
        return ""
    return " (cancelled)" if task.cancelled() else " (finished)"
