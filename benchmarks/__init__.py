"""Benchmarks of asgi_dbpool: ``python -m benchmarks`` (see README). Ratios are measured side by side."""
