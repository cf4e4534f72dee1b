"""Fixed-bucket histograms of pool timings (waits, uses, connection creation)."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

#: Upper bounds in seconds, from sub-millisecond waits to a 30 s pool timeout.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: At most this many observations wait to be folded into the buckets (they are also folded on every read).
FOLD_AT = 256


class Histogram:
    """A fixed-bucket histogram whose ``add(seconds)`` costs one list append on the hot path.

    Observations wait in ``pending`` and are folded into the buckets in a batch (sorted once, one bisect per
    bucket) when the figures are read, or by whoever adds once ``FOLD_AT`` wait (the pool: every ``FOLD_AT``
    checkouts): a checkout pays an append instead of a Python call, a bisect and three additions.
    """

    __slots__ = ("_count", "_counts", "_sum", "add", "otel", "pending")

    def __init__(self) -> None:
        self._counts = [0] * (len(BUCKETS) + 1)
        self._sum = 0.0
        self._count = 0
        self.pending: list[float] = []
        #: Record one observation: ``pending.append``, or with OpenTelemetry enrolled, that and a record.
        self.add: Callable[[float], None] = self.pending.append
        self.otel: tuple[Any, dict[str, str]] | None = None  # (OpenTelemetry histogram, attributes) when enrolled

    def enroll(self, otel: tuple[Any, dict[str, str]] | None) -> None:
        """Record every observation into an OpenTelemetry histogram too (``None``: stop)."""
        self.otel = otel
        self.add = self.pending.append if otel is None else self._add_and_record

    def _add_and_record(self, seconds: float) -> None:
        self.pending.append(seconds)
        otel = self.otel
        if otel is not None:
            otel[0].record(seconds, otel[1])

    def observe(self, seconds: float) -> None:
        """Record one observation (off the hot path; the hot path calls ``add``)."""
        self.add(seconds)
        if len(self.pending) >= FOLD_AT:
            self.fold()

    def fold(self) -> None:
        """Move the pending observations into the buckets."""
        pending = self.pending
        n = len(pending)
        if not n:
            return
        batch = sorted(pending[:n])
        del pending[:n]  # what was added meanwhile (a sync engine's thread) stays pending
        counts = self._counts
        start = 0
        for i, bound in enumerate(BUCKETS):
            end = bisect.bisect_right(batch, bound, start)  # bucket i holds BUCKETS[i-1] < x <= BUCKETS[i]
            counts[i] += end - start
            start = end
        counts[-1] += n - start
        self._sum += sum(batch)
        self._count += n

    @property
    def counts(self) -> list[int]:
        """Observations per bucket, the last one above ``BUCKETS[-1]``."""
        self.fold()
        return self._counts

    @property
    def sum(self) -> float:
        self.fold()
        return self._sum

    @property
    def count(self) -> int:
        self.fold()
        return self._count

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding quantile ``q`` (None without observations)."""
        count = self.count
        if not count:
            return None
        rank, seen = q * count, 0
        for bound, n in zip((*BUCKETS, float("inf")), self._counts, strict=True):
            seen += n
            if seen >= rank:
                return bound
        return float("inf")  # pragma: no cover
