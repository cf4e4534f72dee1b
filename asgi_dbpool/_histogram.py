"""Fixed-bucket histograms of pool timings (waits, uses, connection creation)."""

from __future__ import annotations

import bisect
from typing import Any

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
