"""Interleaved A/B rounds and their summary: medians and min-max of per-round ratios to a baseline."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Series:
    """Rates (higher is better) of several variants, one sample per variant per round."""

    baseline: str
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, variant: str, value: float) -> None:
        self.samples.setdefault(variant, []).append(value)

    def ratios(self, variant: str) -> list[float]:
        return [v / b for v, b in zip(self.samples[variant], self.samples[self.baseline], strict=True)]

    def row(self, variant: str, unit: str, fmt: Callable[[float], str] = lambda v: f"{v:,.0f}") -> list[str]:
        values = self.samples[variant]
        ratios = self.ratios(variant)
        return [
            variant,
            f"{fmt(statistics.median(values))} {unit}",
            f"{statistics.median(ratios):.3f}",
            f"{min(ratios):.3f}-{max(ratios):.3f}",
        ]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
