"""The structured fields of the middleware's log records, for JSON log setups: ``extra=fields(...)`` puts
``step`` (what the line is about), ``engine`` (the pool's name, where there is one) and ``figures`` (the numbers
the message quotes) on the record, next to the prose."""

from __future__ import annotations

from typing import Any


def fields(step: str, engine: str | None = None, **figures: Any) -> dict[str, Any]:
    return {"step": step, "engine": engine, "figures": figures}
