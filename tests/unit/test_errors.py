"""The public exceptions: their names and where they are importable from."""

from __future__ import annotations

import pytest

import asgi_dbpool

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("name", ["ConfigError", "StartupError", "PoolClosedError", "PoolOverloadedError"])
def test_public_exceptions_name_themselves_publicly(name: str) -> None:
    import traceback

    error = getattr(asgi_dbpool, name)("the message")
    assert traceback.format_exception_only(error) == [f"asgi_dbpool.{name}: the message\n"]
