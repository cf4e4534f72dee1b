"""``asgi_dbpool.prometheus`` (the ``prometheus`` extra): the pool metrics in your own ``prometheus_client``
registry, so they appear on the ``/metrics`` endpoint the app already has::

    from prometheus_client import REGISTRY, make_asgi_app
    from asgi_dbpool.prometheus import PoolCollector

    REGISTRY.register(PoolCollector())  # every engine of this process; or PoolCollector(middleware)
    app.mount("/metrics", make_asgi_app())

The families and their names are those of the middleware's own ``{stats_path}/metrics``. A collector reads the
pools of its own process: under gunicorn's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) the
``MultiProcessCollector`` aggregates only the files of ``prometheus_client``'s own metric classes, so the pool
figures come from each worker that answers the scrape (``asgi_dbpool_info{pid=...}`` says which).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine

from ._version import __version__
from .asgi.middleware import DBPoolMiddleware
from .observe.metrics import families
from .pool.registry import all_trackers, name_engines, tracker_for
from .pool.tracker import PoolTracker

__all__ = ["PoolCollector"]


class PoolCollector(Collector):
    """Collects the pool metrics of ``source``: a ``DBPoolMiddleware``, an engine or a mapping of names to
    engines; by default every engine of this process that a middleware (or a stats app) manages."""

    def __init__(self, source: DBPoolMiddleware | AsyncEngine | Mapping[str, AsyncEngine] | None = None) -> None:
        self._source = source

    def _trackers(self) -> Iterable[PoolTracker]:
        source = self._source
        if source is None:
            return all_trackers()
        if isinstance(source, DBPoolMiddleware):
            return source.all_trackers()
        return [tracker_for(engine, name) for name, engine in name_engines(source).items()]

    def collect(self) -> Iterator[Metric]:
        source = self._source
        late = source.late_commits.counts if isinstance(source, DBPoolMiddleware) else None
        for family in families(self._trackers(), __version__, late):
            metric = Metric(family.name, family.doc, family.kind)
            for suffix, labels, value in family.samples:
                metric.add_sample(family.name + suffix, labels, value)
            yield metric
