"""Private API (it may change in any release; the public API is ``asgi_dbpool``, ``asgi_dbpool.starlette``,
``asgi_dbpool.prometheus`` and ``asgi_dbpool.litestar``).

Observation: reading the trackers into metrics (Prometheus text, OpenTelemetry), the pool monitor and the leak
watch, tuning advice and the connection budget. Uses the layers below it. See docs/architecture.md.
"""
