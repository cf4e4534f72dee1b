"""Starlette / FastAPI helpers: a session dependency and the deprecated sync sessionmaker.

Starlette is imported only here, so the core package stays framework-free.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import HTTPConnection

from .asgi.middleware import DBPoolMiddleware
from .base.types import STATE_KEY


def middleware_of(conn: HTTPConnection) -> DBPoolMiddleware:
    """The :class:`DBPoolMiddleware` serving this request (from ``scope["state"]``)."""
    state = conn.scope.get("state") or {}
    mw = state.get(STATE_KEY)
    if not isinstance(mw, DBPoolMiddleware):
        raise RuntimeError(
            "no DBPoolMiddleware in this request's state; wrap the app with DBPoolMiddleware "
            "(or app.add_middleware(DBPoolMiddleware, engine=...)) before using get_session."
        )
    return mw


async def get_session(conn: HTTPConnection) -> AsyncIterator[AsyncSession]:
    """Yield an ``AsyncSession`` of the default engine; roll back on error; always close it.

    FastAPI: ``session: AsyncSession = Depends(get_session)``. Starlette: ``async with session_scope(request)``.
    """
    async with middleware_of(conn).sessionmaker()() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise


session_scope = contextlib.asynccontextmanager(get_session)
"""``async with session_scope(request) as session:`` — :func:`get_session` as a context manager."""


class LegacySessionmaker(sessionmaker[Session]):
    """A sync ``sessionmaker`` whose every use warns: the sync layer is deprecated, migrate to async."""

    def __call__(self, **local_kw: Any) -> Session:
        warnings.warn(
            "The sync SessionLocal is deprecated: it blocks the event loop. Use the async session "
            "(asgi_dbpool.starlette.get_session) instead.",
            DeprecationWarning,
            stacklevel=2,
        )
        return super().__call__(**local_kw)


def legacy_sessionmaker(engine: Engine, **kwargs: Any) -> LegacySessionmaker:
    """A deprecated sync sessionmaker for the legacy engine (pass the engine to ``sync_engines=`` too)."""
    return LegacySessionmaker(bind=engine, **kwargs)


__all__ = ["LegacySessionmaker", "get_session", "legacy_sessionmaker", "middleware_of", "session_scope"]
