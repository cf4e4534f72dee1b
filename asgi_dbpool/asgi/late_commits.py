"""ORM commits that start after their request's response went out, per route template."""

from __future__ import annotations

import logging
import sys
from types import FrameType
from typing import Any

from greenlet import getcurrent
from sqlalchemy.orm import Session

from ..base.records import fields
from ..base.types import STATE_KEY
from .request import InFlight, get_request

logger = logging.getLogger("asgi_dbpool")


def on_session_commit(session: Session) -> None:
    """Mark the request as having tried a COMMIT (before it is sent: a cut-off COMMIT may have landed).

    An ORM event, not a Core ``ConnectionEvents.commit`` listener: a Core listener on the engine switches on
    event dispatch for every statement (about 2% end to end here). Commits through ``AsyncConnection`` /
    ``engine.begin()`` directly are therefore not seen.
    """
    request = get_request()
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
