"""Histograms: batched observations bucket exactly as one bisect per observation would."""

from __future__ import annotations

import bisect
import random

import pytest

from asgi_dbpool.pool.histogram import BUCKETS, FOLD_AT, Histogram


def test_batched_histogram_buckets_every_observation_as_a_bisect_would() -> None:
    rng = random.Random(18)
    values = [rng.choice(BUCKETS) for _ in range(300)] + [rng.uniform(0, 40) for _ in range(1200)] + [0.0, 31.0]
    expected = [0] * (len(BUCKETS) + 1)
    for value in values:
        expected[bisect.bisect_left(BUCKETS, value)] += 1  # the per-observation rule: upper bounds inclusive
    histogram = Histogram()
    for i, value in enumerate(values):
        histogram.add(value)
        if i % 97 == 0:  # reads in between fold partial batches
            assert histogram.count == i + 1
    assert histogram.counts == expected
    assert histogram.count == len(values)
    assert histogram.sum == pytest.approx(sum(values))
    assert histogram.pending == []


def test_observe_folds_at_the_bound() -> None:
    histogram = Histogram()
    for _ in range(FOLD_AT - 1):
        histogram.observe(0.001)
    assert len(histogram.pending) == FOLD_AT - 1
    histogram.observe(0.001)
    assert histogram.pending == []
    assert histogram.counts[1] == FOLD_AT
