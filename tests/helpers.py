"""Test helpers: a scripted ASGI server side for lifespan and WebSocket conversations."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from prometheus_client.parser import text_string_to_metric_families

from asgi_dbpool.base.types import ASGIApp, Message

STOP = (signal.SIGINT, signal.SIGTERM)


class LifespanDriver:
    """Plays the server in a lifespan conversation and records every message the app sends."""

    def __init__(self, app: ASGIApp, state: dict[str, Any] | None = None) -> None:
        self.app = app
        self.state: dict[str, Any] = {} if state is None else state
        self.sent: list[Message] = []
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._answer = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def _receive(self) -> Message:
        return await self._inbox.get()

    async def _send(self, message: Message) -> None:
        self.sent.append(message)
        self._answer.set()

    async def _ask(self, kind: str) -> Message:
        self._answer.clear()
        await self._inbox.put({"type": kind})
        assert self.task is not None
        waiter = asyncio.ensure_future(self._answer.wait())
        await asyncio.wait([waiter, self.task], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not self._answer.is_set():
            self.task.result()  # re-raise the app's exception
            raise AssertionError("the app returned without answering")
        return self.sent[-1]

    async def startup(self) -> Message:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        self.task = asyncio.create_task(self.app(scope, self._receive, self._send))
        return await self._ask("lifespan.startup")

    async def shutdown(self) -> Message:
        message = await self._ask("lifespan.shutdown")
        assert self.task is not None
        await self.task
        return message

    def types(self) -> list[str]:
        return [m["type"] for m in self.sent]


class WebSocketPeer:
    """The server side of one WebSocket: feeds ``receive`` and records ``send``."""

    def __init__(self, app: ASGIApp, path: str = "/ws", state: dict[str, Any] | None = None) -> None:
        self.app = app
        self.scope = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [],
            "scheme": "ws",
            "server": ("127.0.0.1", 80),
            "client": ("127.0.0.1", 5000),
            "subprotocols": [],
            "state": dict(state or {}),
        }
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.sent: list[Message] = []
        self.accepted = asyncio.Event()
        self.closed_by_server = False
        self.close_hangs = False
        self.task: asyncio.Task[None] | None = None

    async def _receive(self) -> Message:
        return await self.inbox.get()

    async def _send(self, message: Message) -> None:
        if message["type"] == "websocket.close" and self.close_hangs:
            await asyncio.Event().wait()  # a server that never takes the close frame
        if self.closed_by_server:
            raise RuntimeError("Unexpected ASGI message 'websocket.close', after sending 'websocket.close'.")
        self.sent.append(message)
        if message["type"] == "websocket.accept":
            self.accepted.set()

    async def connect(self) -> None:
        await self.inbox.put({"type": "websocket.connect"})
        self.task = asyncio.create_task(self.app(self.scope, self._receive, self._send))
        waiter = asyncio.ensure_future(self.accepted.wait())
        await asyncio.wait([waiter, self.task], return_when=asyncio.FIRST_COMPLETED)
        if not self.accepted.is_set():
            waiter.cancel()
            self.task.result()
            raise AssertionError("not accepted")

    def types(self) -> list[str]:
        return [m["type"] for m in self.sent]


@contextlib.contextmanager
def server_signal_handlers() -> Iterator[list[int]]:
    """SIGINT and SIGTERM handled as uvicorn handles them while it serves (a Python handler that notes them and
    asks the server to stop); the previous handlers are restored after. Enter it before the lifespan starts."""
    heard: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: heard.append(signum)) for sig in STOP}
    try:
        yield heard
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def cut_off_post(app: ASGIApp, reached: asyncio.Event, msg: str | None = None) -> list[Message]:
    """POST / to ``app`` in a task, wait until the handler set ``reached``, then stop as a server does: SIGINT
    (see :func:`server_signal_handlers`), then the request task cancelled (graceful timeout, force exit); return
    what the app sent. The task must end without an exception."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b"", "root_path": ""}
    task = asyncio.create_task(app(scope, receive, send))
    await asyncio.wait_for(reached.wait(), 10)
    signal.raise_signal(signal.SIGINT)
    await asyncio.sleep(0.01)  # the middleware hears of it in the loop
    task.cancel(msg)
    await task  # the cancellation ended in an answer, not an exception for the server to print
    assert task.cancelling() == 0
    return sent


#: The stats endpoint's default path.
PATH = "/api/system/database/pool"


def samples(metrics_text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, keyed by name and sorted labels, as prometheus_client's own parser reads them."""
    out = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client
