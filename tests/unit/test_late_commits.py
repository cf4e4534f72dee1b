"""The late-commit table's labels: route templates only (Starlette/FastAPI ``scope["route"]``, Litestar's
``path_template``), ``other`` for a request without one and for routes past ``LateCommits.MAX_ROUTES``; one
WARNING per label."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from asgi_dbpool.asgi.late_commits import LateCommits
from asgi_dbpool.asgi.request import InFlight


def request(scope: dict[str, object]) -> InFlight:
    return InFlight.start({"method": "POST", **scope}, None)


def test_labels_are_templates_and_bounded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_dbpool")
    late = LateCommits()
    late.note(request({"path": "/items/1", "route": SimpleNamespace(path="/items/{item_id}")}))  # Starlette
    late.note(request({"path": "/items/2", "route": SimpleNamespace(path="/items/{item_id}")}))
    late.note(request({"path": "/orders/9", "path_template": "/orders/{order_id:int}"}))  # Litestar
    late.note(request({"path": "/raw/42"}))  # raw ASGI: never the raw path
    for n in range(LateCommits.MAX_ROUTES + 5):
        late.note(request({"path": f"/r/{n}", "path_template": f"/r{n}"}))
    assert len(late.counts) == LateCommits.MAX_ROUTES  # "other" among them (at most one label more)
    assert late.counts["POST /items/{item_id}"] == 2
    assert late.counts["POST /orders/{order_id:int}"] == 1
    assert late.counts["other"] == 1 + 8  # the raw path, and the routes past the cap (97 fit beside 3)
    assert not any("/raw/42" in label or "/r/" in label for label in late.counts)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == LateCommits.MAX_ROUTES
