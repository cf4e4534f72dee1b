"""``PoolStatsApp``: a tiny pure-ASGI app that answers the pool figures as JSON."""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from .._version import __version__
from ..base.types import Receive, Scope, Send
from ..lifecycle.shutdown_flag import is_shutting_down
from ..observe.advice import advise
from ..observe.metrics import OPENMETRICS_1_0, TEXT_0_0_4, render, wants_openmetrics
from ..pool.registry import name_engines, tracker_for
from ..pool.tracker import PoolTracker

logger = logging.getLogger("asgi_dbpool")

_JSON = (b"content-type", b"application/json")
_NO_STORE = (b"cache-control", b"no-store")


def route_path(scope: Scope) -> str:
    """The path below the scope's ``root_path`` (as Starlette computes it)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class PoolStatsApp:
    """Answer ``GET``/``HEAD`` with ``{"pool_size", "checked_in", "checked_out", "overflow", "invalid", ...}``.

    ``engines`` is an ``AsyncEngine`` (or sync ``Engine``) or a mapping of names to engines; the first is
    the default, whose figures are also at the top level. With ``token``, requests need
    ``Authorization: Bearer <token>``. No URL, host or credential is ever part of the answer.
    """

    def __init__(
        self,
        engines: Any,
        token: str | None = None,
        *,
        shutting_down: Callable[[], bool] = is_shutting_down,
        late_commits: Mapping[str, int] | None = None,
    ) -> None:
        if token is not None and not token:
            raise ValueError("stats_token='' would accept no request; pass None to turn auth off.")
        named = name_engines(engines)
        self.trackers: list[PoolTracker] = [tracker_for(engine, name) for name, engine in named.items()]
        self.names = list(named)
        self._token = None if token is None else token.encode()
        self._shutting_down = shutting_down
        self._late_commits = late_commits  # the middleware's (its app's commits after the response)

    def figures(self) -> dict[str, Any]:
        """The JSON document the endpoint answers."""
        per_engine = {name: tracker.snapshot() for name, tracker in zip(self.names, self.trackers, strict=True)}
        return {
            **per_engine[self.names[0]],
            "status": "shutting_down" if self._shutting_down() else "ok",
            "pid": os.getpid(),
            "default_engine": self.names[0],
            "engines": per_engine,
        }

    def _authorized(self, scope: Scope) -> bool:
        if self._token is None:
            return True
        for key, value in scope.get("headers", ()):
            if key.lower() == b"authorization":
                scheme, _, credentials = bytes(value).strip().partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(credentials.strip(), self._token)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            return
        head = scope.get("method") == "HEAD"
        if not self._authorized(scope):
            await _reply(
                send, 401, {"detail": "a valid bearer token is required"}, head, [(b"www-authenticate", b"Bearer")]
            )
            return
        sub = route_path(scope).strip("/")
        if sub not in ("", "metrics", "ready", "advice"):
            await _reply(send, 404, {"detail": "not found"}, head)
            return
        if scope.get("method") not in ("GET", "HEAD"):
            await _reply(send, 405, {"detail": "method not allowed"}, head, [(b"allow", b"GET, HEAD")])
            return
        if sub == "ready":  # for load balancers: 503 from the moment shutdown begins
            down = self._shutting_down()
            await _reply(send, 503 if down else 200, {"status": "shutting_down" if down else "ready"}, head)
            return
        try:
            if sub == "metrics":
                accept = dict(scope.get("headers") or []).get(b"accept", b"").decode("latin-1")
                openmetrics = wants_openmetrics(accept)
                data = render(
                    self.trackers, __version__, openmetrics=openmetrics, late_commits=self._late_commits
                ).encode()
                kind = OPENMETRICS_1_0 if openmetrics else TEXT_0_0_4
                await _send(send, 200, data, head, [(b"content-type", kind.encode())])
                return
            body = self.advice() if sub == "advice" else self.figures()
        except Exception:
            logger.exception("could not read the pool figures")
            await _reply(send, 503, {"detail": "pool figures unavailable"}, head)
            return
        await _reply(send, 200, body, head)

    def advice(self) -> dict[str, Any]:
        """Tuning advice per engine (``{stats_path}/advice``)."""
        return {"engines": {name: advise(t) for name, t in zip(self.names, self.trackers, strict=True)}}


async def _reply(
    send: Send, status: int, body: dict[str, Any], head: bool, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    await _send(send, status, json.dumps(body, separators=(",", ":")).encode(), head, [_JSON, *(extra or [])])


async def _send(send: Send, status: int, data: bytes, head: bool, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, _NO_STORE, (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else data})
