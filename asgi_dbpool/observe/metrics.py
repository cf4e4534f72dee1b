"""Every pool's metrics (OpenTelemetry names) as metric families, and their exposition: the Prometheus text
format 0.0.4, exactly as ``prometheus_client`` writes it, and OpenMetrics 1.0 for scrapers that ask for it.
``asgi_dbpool.prometheus`` turns the same families into ``prometheus_client`` ones."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping

from ..pool.histogram import BUCKETS, Histogram
from ..pool.tracker import PoolTracker

TEXT_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_1_0 = "application/openmetrics-text; version=1.0.0; charset=utf-8"

Labels = dict[str, str]


@dataclasses.dataclass(frozen=True)
class Family:
    """One metric family: ``name`` without the ``_total`` of a counter; samples as (suffix, labels, value)."""

    name: str
    kind: str  # "gauge", "counter" or "histogram"
    doc: str
    samples: list[tuple[str, Labels, float]]


GAUGES: tuple[tuple[str, str, Callable[[PoolTracker], int]], ...] = (
    ("db_client_connection_max", "The maximum number of open connections allowed.", lambda t: t.max_connections()),
    ("db_client_connection_idle_max", "The maximum number of idle open connections allowed.", lambda t: t.pool_size()),
    ("db_client_connection_pending_requests", "Tasks waiting for a connection now.", lambda t: t.acquisition.pending),
    ("asgi_dbpool_checked_out_high_water", "Most connections checked out at once.", lambda t: t.checked_out_max),
    ("asgi_dbpool_overflow_high_water", "Most overflow connections open at once.", lambda t: t.overflow_max),
)
COUNTERS: tuple[tuple[str, str, Callable[[PoolTracker], int]], ...] = (
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
HISTOGRAMS: tuple[tuple[str, str, Callable[[PoolTracker], Histogram]], ...] = (
    (
        "db_client_connection_wait_time_seconds",
        "Time to obtain a connection from the pool.",
        lambda t: t.acquisition.wait,
    ),
    ("db_client_connection_use_time_seconds", "Time between checkout and checkin.", lambda t: t.use),
    ("db_client_connection_create_time_seconds", "Time to open a new connection.", lambda t: t.create),
)


def families(
    trackers: Iterable[PoolTracker], version: str, late_commits: Mapping[str, int] | None = None
) -> Iterator[Family]:
    """Every metric family of these pools, read now."""
    trackers = list(trackers)
    info = [("", {"pid": str(os.getpid()), "version": version}, 1.0)]
    yield Family("asgi_dbpool_info", "gauge", "The process that answered (one scrape per worker).", info)
    counts: list[tuple[str, Labels, float]] = []
    for t in trackers:
        snap = t.snapshot()
        counts.append(("", {"pool_name": t.name, "state": "idle"}, snap["checked_in"]))
        counts.append(("", {"pool_name": t.name, "state": "used"}, snap["checked_out"]))
    yield Family("db_client_connection_count", "gauge", "Open connections by state (idle or used).", counts)
    for name, doc, read in GAUGES:
        yield Family(name, "gauge", doc, [("", {"pool_name": t.name}, read(t)) for t in trackers])
    for name, doc, count in COUNTERS:
        yield Family(name, "counter", doc, [("_total", {"pool_name": t.name}, count(t)) for t in trackers])
    # One app's (the middleware's LateCommits), by route template: none for a collector of engines alone.
    late: list[tuple[str, Labels, float]] = [
        ("_total", {"route": r}, n) for r, n in sorted((late_commits or {}).items())
    ]
    yield Family(
        "asgi_dbpool_commits_after_response",
        "counter",
        "ORM commits that started after their request's response was sent (the client heard success first).",
        late,
    )
    for name, doc, histogram in HISTOGRAMS:
        samples: list[tuple[str, Labels, float]] = []
        for t in trackers:
            hist, cumulative = histogram(t), 0
            for bound, n in zip((*BUCKETS, math.inf), hist.counts, strict=True):
                cumulative += n
                samples.append(("_bucket", {"pool_name": t.name, "le": _number(bound)}, cumulative))
            samples.append(("_count", {"pool_name": t.name}, hist.count))
            samples.append(("_sum", {"pool_name": t.name}, hist.sum))
        yield Family(name, "histogram", doc, samples)


def render(
    trackers: Iterable[PoolTracker],
    version: str,
    *,
    openmetrics: bool = False,
    late_commits: Mapping[str, int] | None = None,
) -> str:
    """The families in the Prometheus text format 0.0.4, or OpenMetrics 1.0 (``# EOF`` terminated)."""
    lines: list[str] = []
    for family in families(trackers, version, late_commits):
        # In 0.0.4 the HELP and TYPE lines name a counter's sample (x_total), as prometheus_client writes them;
        # in OpenMetrics they name the family (x).
        named = family.name + "_total" if family.kind == "counter" and not openmetrics else family.name
        lines.append(f"# HELP {named} {_escape_doc(family.doc)}")
        lines.append(f"# TYPE {named} {family.kind}")
        lines.extend(
            f"{family.name}{suffix}{_labels(labels)} {_number(value)}" for suffix, labels, value in family.samples
        )
    if openmetrics:
        lines.append("# EOF")
    return "\n".join(lines) + "\n"


def wants_openmetrics(accept: str) -> bool:
    """True when the scraper's ``Accept`` header asks for OpenMetrics (Prometheus does by default)."""
    return "application/openmetrics-text" in accept


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape_value(value)}"' for key, value in sorted(labels.items())) + "}"


def _escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_doc(doc: str) -> str:
    return doc.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    """A value as Prometheus (Go) writes it, and so prometheus_client: ``+Inf``, ``1.0``, ``0.0025``, ``1e+06``."""
    number = float(value)
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    if math.isnan(number):
        return "NaN"
    text = repr(number)
    dot = text.find(".")
    if number > 0 and dot > 6:  # Go switches to an exponent sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text
