"""Private API (it may change in any release; the public API is ``asgi_dbpool``, ``asgi_dbpool.starlette``,
``asgi_dbpool.prometheus`` and ``asgi_dbpool.litestar``).

The lifecycle of one app's databases: its states and transitions, the wrapped app's inner lifespan, startup
checks, the ordered shutdown, stop signals, the process-wide shutdown flag and the shutdown-noise log filter. Uses
the layers below it; it drains the ASGI layer's requests and WebSockets through the small ``Connections``
protocol it is given. See docs/architecture.md.
"""
