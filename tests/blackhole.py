"""A database that stops answering: a TCP proxy in front of PostgreSQL that can drop everything while keeping
both sockets of every connection open, as a firewall dropping packets, a dead host or a failover looks to a
client: nothing answers and nothing resets. No root, no kernel features: it runs in the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from sqlalchemy.engine import make_url


class Blackhole:
    """Forwards loopback TCP to PostgreSQL's unix socket until :meth:`drop`; from then on every byte in either
    direction is read and thrown away, new connections are accepted and never answered, nothing is closed."""

    def __init__(self, database_url: str) -> None:
        url = make_url(database_url)
        socket_dir = url.query.get("host")
        if not isinstance(socket_dir, str):
            raise ValueError(f"the blackhole needs a unix-socket database URL, got {url!r}")
        self.target = f"{socket_dir}/.s.PGSQL.{url.port or 5432}"
        self.url = database_url
        self.dropping = False
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def drop(self) -> None:
        self.dropping = True

    async def start(self) -> str:
        """Listen on a free loopback port; return the SQLAlchemy URL that goes through the proxy."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        url = make_url(self.url).set(host="127.0.0.1", port=port)
        return url.difference_update_query(["host"]).render_as_string(hide_password=False)

    async def close(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.transport.abort()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(client_writer)
        if self._closed:  # arrived while the proxy closes: nothing is left open behind it
            client_writer.transport.abort()
            return
        accepting = asyncio.current_task()
        if accepting is not None:  # close() cancels an accept still connecting to the server
            self._tasks.add(accepting)
            accepting.add_done_callback(self._tasks.discard)
        if self.dropping:  # accepted by the kernel, never answered
            self._spawn(self._swallow(client_reader))
            return
        server_reader, server_writer = await asyncio.open_unix_connection(self.target)
        self._writers.append(server_writer)
        self._spawn(self._pump(client_reader, server_writer))
        self._spawn(self._pump(server_reader, client_writer))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        await asyncio.Event().wait()  # a FIN is lost in a blackhole too: keep the other side open

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if self.dropping:
                    continue
                writer.write(data)
                await writer.drain()
            if not self.dropping:
                writer.close()  # a clean close is forwarded while the network works
                return
        await asyncio.Event().wait()


@contextlib.asynccontextmanager
async def blackhole(database_url: str) -> AsyncIterator[tuple[Blackhole, str]]:
    hole = Blackhole(database_url)
    url = await hole.start()
    try:
        yield hole, url
    finally:
        await hole.close()
