"""The Prometheus exposition: the format checks themselves."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families as parse_text

from tests.test_exposition import HAVE_PROMTOOL, promtool  # (the promtool check, shared with the scrapes)

pytestmark = pytest.mark.anyio


def test_the_checks_can_fail() -> None:
    """The control: the exposition this project used to serve (TYPE x counter, samples x_total) loses the
    counter's type in prometheus_client's parser, and promtool finds more than the one known lint in it."""
    if not HAVE_PROMTOOL:
        pytest.skip("promtool IS NOT INSTALLED here (.ci/run installs Debian's prometheus)")
    old = "# HELP x_timeouts Timeouts.\n# TYPE x_timeouts counter\nx_timeouts_total 1\n"
    parsed = {family.name: family.type for family in parse_text(old)}
    assert parsed == {"x_timeouts": "counter", "x_timeouts_total": "unknown"}  # the counter lost its sample
    assert promtool(old)[1] == ["x_timeouts_total no help text"]
