"""The same pool instruments on OpenTelemetry's global meter provider, when ``opentelemetry-api`` is installed.

Registered once per process; the callbacks read every tracker a middleware enrolled. Without the package
nothing is imported and nothing is recorded.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .._version import __version__

if TYPE_CHECKING:
    from ..pool.tracker import PoolTracker

POOL = "db.client.connection.pool.name"
_trackers: weakref.WeakSet[PoolTracker] = weakref.WeakSet()
_meter: Any = None


def enroll(trackers: Iterable[PoolTracker]) -> bool:
    """Publish these pools' instruments; False when ``opentelemetry-api`` is not installed."""
    global _meter
    try:
        from opentelemetry import metrics
    except ImportError:
        return False
    if _meter is None:
        _meter = metrics.get_meter("asgi_dbpool", __version__)
        _register(_meter, metrics.Observation)
    # Histograms are recorded on the hot path: only when an SDK provider is configured (before the middleware).
    # (The API's placeholder is ``_ProxyMeterProvider``: the name once checked here without the underscore made
    # every checkout record into the placeholder, about 1 k instructions each.)
    configured = type(metrics.get_meter_provider()).__name__ not in ("_ProxyMeterProvider", "NoOpMeterProvider")
    for tracker in trackers:
        _trackers.add(tracker)
        attributes = {POOL: tracker.name}
        timings = (("wait_time", tracker.acquisition.wait), ("use_time", tracker.use), ("create_time", tracker.create))
        for name, histogram in timings:
            histogram.enroll((_HISTOGRAMS[name], attributes) if configured else None)
    return True


_HISTOGRAMS: dict[str, Any] = {}


def _register(meter: Any, observation: Any) -> None:
    def observe(read: Callable[[PoolTracker], int]) -> Callable[[Any], list[Any]]:
        def callback(options: Any) -> list[Any]:
            return [observation(read(t), {POOL: t.name}) for t in list(_trackers)]

        return callback

    def count(options: Any) -> list[Any]:
        out = []
        for t in list(_trackers):
            snap = t.snapshot()
            out.append(observation(snap["checked_in"], {POOL: t.name, "db.client.connection.state": "idle"}))
            out.append(observation(snap["checked_out"], {POOL: t.name, "db.client.connection.state": "used"}))
        return out

    unit = "{connection}"
    meter.create_observable_up_down_counter("db.client.connection.count", callbacks=[count], unit=unit)
    meter.create_observable_up_down_counter(
        "db.client.connection.max", callbacks=[observe(lambda t: t.max_connections())], unit=unit
    )
    meter.create_observable_up_down_counter(
        "db.client.connection.idle.max", callbacks=[observe(lambda t: t.pool_size())], unit=unit
    )
    meter.create_observable_up_down_counter(
        "db.client.connection.pending_requests", callbacks=[observe(lambda t: t.acquisition.pending)], unit="{request}"
    )
    meter.create_observable_counter(
        "db.client.connection.timeouts", callbacks=[observe(lambda t: t.acquisition.timeouts)], unit="{timeout}"
    )
    for name in ("wait_time", "use_time", "create_time"):
        _HISTOGRAMS[name] = meter.create_histogram(f"db.client.connection.{name}", unit="s")
