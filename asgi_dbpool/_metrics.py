"""Histograms of pool timings and the Prometheus text exposition (OpenTelemetry metric names)."""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._tracker import PoolTracker

#: Upper bounds in seconds, from sub-millisecond waits to a 30 s pool timeout.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """A fixed-bucket histogram: ``observe`` is one bisect and two additions."""

    __slots__ = ("count", "counts", "otel", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0
        self.otel: tuple[Any, dict[str, str]] | None = None  # (OpenTelemetry histogram, attributes) when enrolled

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1
        if self.otel is not None:
            self.otel[0].record(seconds, self.otel[1])

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding quantile ``q`` (None without observations)."""
        if not self.count:
            return None
        rank, seen = q * self.count, 0
        for bound, n in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            seen += n
            if seen >= rank:
                return bound
        return float("inf")  # pragma: no cover


def _labels(**labels: str) -> str:
    def esc(value: str) -> str:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}"


def _family(lines: list[str], name: str, kind: str, doc: str) -> None:
    lines.append(f"# HELP {name} {doc}")
    lines.append(f"# TYPE {name} {kind}")


def render(trackers: Iterable[PoolTracker], version: str) -> str:
    """All pools' metrics in the Prometheus text format (version 0.0.4)."""
    trackers = list(trackers)
    lines: list[str] = []
    _family(lines, "asgi_dbpool_info", "gauge", "The process that answered (one scrape per worker).")
    lines.append(f"asgi_dbpool_info{_labels(pid=str(os.getpid()), version=version)} 1")
    gauges: tuple[tuple[str, str, Callable[[PoolTracker], int]], ...] = (
        ("db_client_connection_max", "The maximum number of open connections allowed.", lambda t: t.max_connections()),
        (
            "db_client_connection_idle_max",
            "The maximum number of idle open connections allowed.",
            lambda t: t.pool_size(),
        ),
        ("db_client_connection_pending_requests", "Tasks waiting for a connection now.", lambda t: t.pending),
        ("asgi_dbpool_checked_out_high_water", "Most connections checked out at once.", lambda t: t.checked_out_max),
        ("asgi_dbpool_overflow_high_water", "Most overflow connections open at once.", lambda t: t.overflow_max),
    )
    _family(lines, "db_client_connection_count", "gauge", "Open connections by state (idle or used).")
    for t in trackers:
        snap = t.snapshot()
        lines.append(f"db_client_connection_count{_labels(pool_name=t.name, state='idle')} {snap['checked_in']}")
        lines.append(f"db_client_connection_count{_labels(pool_name=t.name, state='used')} {snap['checked_out']}")
    for name, doc, read in gauges:
        _family(lines, name, "gauge", doc)
        lines.extend(f"{name}{_labels(pool_name=t.name)} {read(t)}" for t in trackers)
    counters = (
        ("db_client_connection_timeouts", "Checkouts that timed out waiting for a connection.", "timeouts"),
        ("db_client_connection_rejected", "Checkouts refused at once (max_pending tasks already waiting).", "rejected"),
        ("asgi_dbpool_overload_responses", "503 answers sent because the pool was exhausted.", "overload_answers"),
        ("asgi_dbpool_invalidations", "Connections invalidated (found broken).", "invalidations"),
        ("asgi_dbpool_leaks", "Checkouts held longer than the leak threshold.", "leaks"),
        ("asgi_dbpool_reclaimed", "Leaked connections closed by the middleware at shutdown.", "reclaimed"),
    )
    for name, doc, attr in counters:
        _family(lines, name, "counter", doc)
        lines.extend(f"{name}_total{_labels(pool_name=t.name)} {getattr(t, attr)}" for t in trackers)
    histograms = (
        ("db_client_connection_wait_time_seconds", "Time to obtain a connection from the pool.", "wait"),
        ("db_client_connection_use_time_seconds", "Time between checkout and checkin.", "use"),
        ("db_client_connection_create_time_seconds", "Time to open a new connection.", "create"),
    )
    for name, doc, attr in histograms:
        _family(lines, name, "histogram", doc)
        for t in trackers:
            hist: Histogram = getattr(t, attr)
            cumulative = 0
            for bound, n in zip((*BUCKETS, float("inf")), hist.counts, strict=True):
                cumulative += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f"{name}_bucket{_labels(pool_name=t.name, le=le)} {cumulative}")
            lines.append(f"{name}_sum{_labels(pool_name=t.name)} {hist.sum!r}")
            lines.append(f"{name}_count{_labels(pool_name=t.name)} {hist.count}")
    return "\n".join(lines) + "\n"
