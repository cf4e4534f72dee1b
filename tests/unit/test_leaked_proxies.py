"""Finding the proxy a leaked connection was handed out as, without SQLAlchemy's private ``fairy_ref``."""

from __future__ import annotations

import gc
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.pool import PoolProxiedConnection

from asgi_dbpool.pool.tracker import proxies_of


def test_the_proxy_of_each_checked_out_entry_is_found_and_none_once_checked_in(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}", pool_size=2)
    other = create_engine(f"sqlite:///{tmp_path / 'other.db'}", pool_size=1)
    try:
        first, second, elsewhere = engine.connect(), engine.connect(), other.connect()
        for conn in (first, second, elsewhere):
            conn.execute(text("SELECT 1"))
        proxies = [first.connection, second.connection]
        records = [p._connection_record for p in proxies]  # (the test's own way to the entries)
        found = proxies_of(records)
        assert found == {id(records[0]): proxies[0], id(records[1]): proxies[1]}
        assert all(isinstance(p, PoolProxiedConnection) for p in found.values())
        assert proxies_of(records[1:]) == {id(records[1]): proxies[1]}  # only those asked for
        first.close()
        del found
        gc.collect()
        assert proxies_of(records) == {id(records[1]): proxies[1]}  # checked in: it dropped its entry
        proxies[1].invalidate()  # handed back by SQLAlchemy itself: nothing to close
        assert proxies_of(records) == {}
        second.close()
        elsewhere.close()
    finally:
        engine.dispose()
        other.dispose()
