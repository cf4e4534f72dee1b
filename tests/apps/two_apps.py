"""Two wrapped apps in one process, each driven by its own lifespan conversation, where nothing else handles
SIGTERM (its default action): the middleware holds it. ``python -m tests.apps.two_apps URL NAME MODE``:

- ``running``: SIGTERM while both run (no server asks for a shutdown);
- ``answering``: the server asks the first app for its shutdown, and SIGTERM comes while it runs.

Prints ``<app> answered <message type>`` as each conversation gets its answer; the process must end by SIGTERM
only after every app closed its connections and answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette

from asgi_dbpool import DBPoolMiddleware

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")


def app(url: str, name: str, slow_shutdown: float) -> DBPoolMiddleware:
    engine = create_async_engine(url, connect_args={"server_settings": {"application_name": name}})

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        yield
        await asyncio.sleep(slow_shutdown)  # the app's own shutdown takes a while

    return DBPoolMiddleware(Starlette(lifespan=lifespan), engine)


async def converse(
    label: str, wrapped: DBPoolMiddleware, inbox: asyncio.Queue[dict[str, str]], started: asyncio.Event
) -> None:
    async def send(message: dict[str, Any]) -> None:
        print(f"{label} answered {message['type']}", flush=True)
        if message["type"] == "lifespan.startup.complete":
            started.set()

    await wrapped({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send)


async def main(url: str, name: str, mode: str) -> None:
    inboxes: list[asyncio.Queue[dict[str, str]]] = [asyncio.Queue(), asyncio.Queue()]
    apps = [app(url, f"{name}_a", 1.0), app(url, f"{name}_b", 0.2)]
    started = [asyncio.Event(), asyncio.Event()]
    tasks = [
        asyncio.create_task(converse(label, a, q, e))
        for label, a, q, e in zip("ab", apps, inboxes, started, strict=True)
    ]
    for inbox in inboxes:
        await inbox.put({"type": "lifespan.startup"})
    await asyncio.gather(*(event.wait() for event in started))
    print("both running", flush=True)
    if mode == "answering":
        await inboxes[0].put({"type": "lifespan.shutdown"})
        await asyncio.sleep(0.3)  # the first app is in its own (slow) shutdown
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.gather(*tasks)
    await asyncio.sleep(5)
    print("the process outlived the signal", flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
