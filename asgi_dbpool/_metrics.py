"""The Prometheus text exposition of every pool (OpenTelemetry metric names)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from ._histogram import BUCKETS, Histogram
from ._tracker import PoolTracker


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
        (
            "db_client_connection_pending_requests",
            "Tasks waiting for a connection now.",
            lambda t: t.acquisition.pending,
        ),
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
    counters: tuple[tuple[str, str, Callable[[PoolTracker], int]], ...] = (
        (
            "db_client_connection_timeouts",
            "Checkouts that timed out waiting for a connection.",
            lambda t: t.acquisition.timeouts,
        ),
        (
            "db_client_connection_rejected",
            "Checkouts refused at once (max_pending tasks already waiting).",
            lambda t: t.acquisition.rejected,
        ),
        (
            "asgi_dbpool_overload_responses",
            "503 answers sent because the pool was exhausted.",
            lambda t: t.overload_answers,
        ),
        ("asgi_dbpool_invalidations", "Connections invalidated (found broken).", lambda t: t.invalidations),
        ("asgi_dbpool_leaks", "Checkouts held longer than the leak threshold.", lambda t: t.leaks),
        ("asgi_dbpool_reclaimed", "Leaked connections closed by the middleware at shutdown.", lambda t: t.reclaimed),
    )
    for name, doc, count in counters:
        _family(lines, name, "counter", doc)
        lines.extend(f"{name}_total{_labels(pool_name=t.name)} {count(t)}" for t in trackers)
    histograms: tuple[tuple[str, str, Callable[[PoolTracker], Histogram]], ...] = (
        (
            "db_client_connection_wait_time_seconds",
            "Time to obtain a connection from the pool.",
            lambda t: t.acquisition.wait,
        ),
        ("db_client_connection_use_time_seconds", "Time between checkout and checkin.", lambda t: t.use),
        ("db_client_connection_create_time_seconds", "Time to open a new connection.", lambda t: t.create),
    )
    for name, doc, histogram in histograms:
        _family(lines, name, "histogram", doc)
        for t in trackers:
            hist = histogram(t)
            cumulative = 0
            for bound, n in zip((*BUCKETS, float("inf")), hist.counts, strict=True):
                cumulative += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f"{name}_bucket{_labels(pool_name=t.name, le=le)} {cumulative}")
            lines.append(f"{name}_sum{_labels(pool_name=t.name)} {hist.sum!r}")
            lines.append(f"{name}_count{_labels(pool_name=t.name)} {hist.count}")
    return "\n".join(lines) + "\n"
