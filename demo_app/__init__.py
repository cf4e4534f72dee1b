"""A small but real Starlette app on asgi_dbpool: ``python -m demo_app`` (see the README)."""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
