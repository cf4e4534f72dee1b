"""One tracker per engine, shared by the middleware and the stats app; engine arguments normalised."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy.ext.asyncio import AsyncEngine

from .tracked_pool import tracker_of
from .tracker import PoolTracker

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine


#: Each engine's tracker, both weakly: an entry lasts as long as the engine and keeps neither alive. The engine's pool
#: class holds its tracker, and the tracker its engine (what holds a tracker, a middleware's lifecycle or a stats app,
#: keeps its engine working): a strong value would keep its own key alive forever.
_registry: weakref.WeakKeyDictionary[Engine, weakref.ref[PoolTracker]] = weakref.WeakKeyDictionary()


def tracker_for(engine: Engine | AsyncEngine, name: str) -> PoolTracker:
    """The one tracker of ``engine`` (created on first use, shared by middleware and stats app)."""
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    known = _registry.get(sync_engine)
    tracker = known() if known is not None else None
    if tracker is None:
        # An engine sharing a tracked pool (engine.execution_options(...)) shares its tracker: the pool reports to one.
        # An engine built with poolclass=tracker.pool_class(...) (PoolSettings) has its tracker, still unnamed.
        tracker = cast("PoolTracker | None", tracker_of(sync_engine.pool))
        if tracker is None:
            tracker = PoolTracker(engine, name)
        elif not tracker.named:
            tracker.rename(name)
        _registry[sync_engine] = weakref.ref(tracker)
    elif tracker.async_engine is None and isinstance(engine, AsyncEngine):
        tracker.async_engine = engine
    return tracker


def all_trackers() -> list[PoolTracker]:
    """Every live engine's tracker in this process (each engine a middleware or a stats app was given), once each
    (engines sharing a pool share its tracker)."""
    trackers = (ref() for ref in list(_registry.values()))
    return list(dict.fromkeys(t for t in trackers if t is not None))


def name_engines(engines: Any) -> dict[str, Any]:
    """Normalise ``engine`` arguments: one engine becomes ``{"default": engine}``; a mapping is kept in order."""
    if isinstance(engines, AsyncEngine) or (hasattr(engines, "pool") and hasattr(engines, "dispose")):
        return {"default": engines}
    if hasattr(engines, "items"):
        named = dict(engines.items())
        if not named:
            raise ValueError("the engine mapping is empty; pass at least one AsyncEngine.")
        for key, value in named.items():
            if not isinstance(key, str) or not (isinstance(value, AsyncEngine) or hasattr(value, "pool")):
                raise TypeError(f"engine {key!r}: expected an AsyncEngine or Engine, got {value!r}.")
        return named
    raise TypeError(f"expected an AsyncEngine or a mapping of names to engines, got {engines!r}.")
