"""The responses the middleware sends itself (shutting down, pool exhausted, cut off after a commit)."""

from __future__ import annotations

from ..base.types import Send

SHUTTING_DOWN = b'{"detail":"the server is shutting down; nothing was committed"}'
SHUT_AFTER_COMMIT = b'{"detail":"the server shut down while answering, after a commit: the changes may be saved"}'
POOL_EXHAUSTED = b'{"detail":"the database connection pool is exhausted; retry later"}'


async def respond(send: Send, status: int, body: bytes, *, retry_after: int | None, close: bool) -> bool:
    """Send a whole JSON response; False when a response had already started (servers refuse a second)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
    except Exception:
        return False
    await send({"type": "http.response.body", "body": body})
    return True
