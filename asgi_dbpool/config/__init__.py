"""Private API (it may change in any release; the public API is ``asgi_dbpool``, ``asgi_dbpool.starlette``,
``asgi_dbpool.prometheus`` and ``asgi_dbpool.litestar``).

Configuration: parsing one setting, the middleware's options, ``PoolSettings`` and what each driver needs when an
engine is built. Uses only the base layer. See docs/architecture.md.
"""
