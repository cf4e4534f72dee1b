"""The stats app: any request (arbitrary methods, paths, queries, headers, tokens) gets an answer, never an error."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette

from asgi_dbpool import DBPoolMiddleware, PoolStatsApp

SECRET_URL = "postgresql+asyncpg://fuzzuser:fuzz-pa55word@db.internal.example:6543/fuzzdb"
SECRETS = ("fuzzuser", "fuzz-pa55word", "db.internal.example", "6543", "fuzzdb", "postgresql")
TOKEN = "t0ken-✓"  # non-ASCII on purpose


@pytest.fixture(scope="module")
def stats_app() -> Iterator[PoolStatsApp]:
    engine = create_async_engine(SECRET_URL)  # never connected: the figures come from the pool object
    yield PoolStatsApp({"main": engine}, token=TOKEN, shutting_down=lambda: False)
    asyncio.run(engine.dispose())


def call(app: PoolStatsApp, scope: dict[str, Any]) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start, body = sent
    return start["status"], dict(start["headers"]), body["body"]


header_bytes = st.binary(max_size=64).filter(lambda b: b"\r" not in b and b"\n" not in b)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.text(min_size=1, max_size=12),
    sub_path=st.text(max_size=40),
    query=st.binary(max_size=60),
    headers=st.lists(st.tuples(header_bytes, header_bytes), max_size=6),
    token=st.one_of(st.none(), st.just(TOKEN), st.text(max_size=80), st.binary(max_size=80)),
)
@example(method="GET", sub_path="", query=b"", headers=[], token=TOKEN)
@example(method="HEAD", sub_path="", query=b"", headers=[], token=TOKEN)
@example(method="HEAD", sub_path="x", query=b"", headers=[], token=None)
@example(method="POST", sub_path="/", query=b"a=1", headers=[], token=TOKEN)
@example(method="GET", sub_path="metrics", query=b"", headers=[], token=TOKEN)
@example(method="GET", sub_path="/ready/", query=b"", headers=[], token=TOKEN)
@example(method="GET", sub_path="advice", query=b"", headers=[], token=TOKEN)
@example(method="GET", sub_path="metricsx", query=b"", headers=[], token=TOKEN)
def test_stats_never_fails_and_never_leaks(
    stats_app: PoolStatsApp,
    method: str,
    sub_path: str,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    token: str | bytes | None,
) -> None:
    raw_headers = [(k.lower(), v) for k, v in headers if k.lower() != b"authorization"]
    if token is not None:
        value = token.encode("utf-8", "surrogatepass") if isinstance(token, str) else token
        raw_headers.append((b"authorization", b"Bearer " + value))
    path = "/pool/" + sub_path
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "/pool",
        "query_string": query,
        "headers": raw_headers,
    }
    status, response_headers, body = call(stats_app, scope)
    text = body.decode()
    for secret in SECRETS:
        assert secret not in text
    if method == "HEAD":
        assert body == b""
    elif response_headers[b"content-type"] == b"application/json":
        document = json.loads(body)
    else:
        assert response_headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
    authorized = token == TOKEN
    if not authorized:
        assert status == 401
        assert response_headers[b"www-authenticate"] == b"Bearer"
    elif sub_path.strip("/") not in ("", "metrics", "ready", "advice"):
        assert status == 404
    elif method not in ("GET", "HEAD"):
        assert (status, response_headers[b"allow"]) == (405, b"GET, HEAD")
    else:
        assert status == 200
        if method == "GET" and not sub_path.strip("/"):
            assert document["engines"]["main"]["pool_size"] == 5


def test_websocket_scope_is_refused(stats_app: PoolStatsApp) -> None:
    sent: list[dict[str, Any]] = []

    async def run() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "websocket.connect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await stats_app({"type": "websocket", "path": "/pool", "headers": []}, receive, send)

    asyncio.run(run())
    assert sent == [{"type": "websocket.close", "code": 1008}]


@pytest.mark.parametrize("bad", ["pool", "/", ""])
def test_bad_stats_path(bad: str) -> None:
    with pytest.raises(ValueError, match="stats_path="):
        DBPoolMiddleware(Starlette(), {"x": object()}, stats_path=bad)  # type: ignore[dict-item]
