"""Private API (it may change in any release; the public API is ``asgi_dbpool``, ``asgi_dbpool.starlette``,
``asgi_dbpool.prometheus`` and ``asgi_dbpool.litestar``).

The ASGI surface: ``DBPoolMiddleware``, the responses it sends itself, the request in flight, the HTTP and
WebSocket connections tracker, late-commit detection and the pool stats app. Uses every layer below it. See
docs/architecture.md.
"""
