"""Private API (it may change in any release; the public API is ``asgi_dbpool``, ``asgi_dbpool.starlette``,
``asgi_dbpool.prometheus`` and ``asgi_dbpool.litestar``).

Pool tracking: the tracked pool class, acquisition, the per-engine tracker and its registry, the checkout site, the
timing histograms and what differs per driver at run time. May use the base and configuration layers. See
docs/architecture.md.
"""
