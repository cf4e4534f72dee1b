"""Private API (it may change in any release; the public API is ``asgi_dbpool``, ``asgi_dbpool.starlette``,
``asgi_dbpool.prometheus`` and ``asgi_dbpool.litestar``).

The base layer: what every other layer may use, and which uses nothing of the package. See docs/architecture.md.
"""
