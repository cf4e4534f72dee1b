"""PoolSettings: profiles, environment variables, their parsing and the errors that name them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_dbpool import ConfigError, PoolSettings

pytestmark = pytest.mark.anyio


BAD = [
    ("DB_POOL_SIZE", "", "is not a whole number"),
    ("DB_POOL_SIZE", "ten", "is not a whole number"),
    ("DB_POOL_SIZE", "-1", "is out of range"),
    ("DB_POOL_SIZE", "0", "is out of range"),
    ("DB_POOL_SIZE", "1.5", "is not a whole number"),
    ("DB_POOL_SIZE", "99999999999999999999", "is out of range"),
    ("DB_MAX_OVERFLOW", "-5", "is out of range"),
    ("DB_POOL_TIMEOUT", "soon", "is not a number of seconds"),
    ("DB_POOL_TIMEOUT", "0", "is out of range"),
    ("DB_POOL_TIMEOUT", "-3", "is out of range"),
    ("DB_POOL_TIMEOUT", "nan", "is out of range"),
    ("DB_POOL_TIMEOUT", "inf", "is out of range"),
    ("DB_POOL_TIMEOUT", "1e12", "is out of range"),
    ("DB_POOL_RECYCLE", "-1", "is out of range"),
    ("DB_QUERY_TIMEOUT", "", "is not a number of seconds"),
    ("DB_POOL_PRE_PING", "maybe", "is not a boolean"),
    ("DB_POOL_PRE_PING", "", "is not a boolean"),
    ("ENVIRONMENT", "", "is not an environment name"),
    ("ENVIRONMENT", "prod uction", "is not an environment name"),
    ("ASYNC_DATABASE_URL", "mariadb+asyncmy://u:p@h/db", "unsupported scheme 'mariadb+asyncmy'"),
    ("ASYNC_DATABASE_URL", "not a url", "is not a database URL"),
    ("DATABASE_URL", "sqlite:///x.db", "unsupported scheme 'sqlite'"),
    ("WEB_CONCURRENCY", "four", "is not a whole number"),
    ("WEB_CONCURRENCY", "0", "is out of range"),
    ("DB_HOSTS", "0", "is out of range"),
    ("DB_PGBOUNCER_POOL_SIZE", "-1", "is out of range"),
]


def test_development_defaults() -> None:
    s = PoolSettings.from_env({})
    assert (s.environment, s.pool_size, s.max_overflow, s.pool_timeout, s.pool_recycle, s.pool_pre_ping) == (
        "development",
        10,
        20,
        30.0,
        3600,
        True,
    )
    assert s.query_timeout == 30.0
    assert PoolSettings.from_env({"ENVIRONMENT": "staging"}).pool_size == 10


def test_production_defaults() -> None:
    s = PoolSettings.from_env({"ENVIRONMENT": " Production "})
    assert (s.environment, s.pool_size, s.max_overflow, s.pool_timeout, s.pool_recycle) == (
        "production",
        30,
        40,
        30.0,
        1800,
    )
    assert s.is_production


@pytest.mark.parametrize("spelling", ["prod", "PROD", "Prod", "production", "PRODUCTION"])
def test_the_common_spellings_of_production(spelling: str) -> None:
    s = PoolSettings.from_env({"ENVIRONMENT": spelling})
    assert (s.environment, s.pool_size, s.max_overflow, s.pool_recycle) == ("production", 30, 40, 1800)


def test_variables_override_the_profile() -> None:
    s = PoolSettings.from_env(
        {
            "ENVIRONMENT": "production",
            "DB_POOL_SIZE": "8",
            "DB_MAX_OVERFLOW": "0",
            "DB_POOL_TIMEOUT": "2.5",
            "DB_POOL_RECYCLE": "0",
            "DB_POOL_PRE_PING": "off",
            "DB_QUERY_TIMEOUT": "0",
        }
    )
    assert (s.pool_size, s.max_overflow, s.pool_timeout, s.pool_recycle, s.pool_pre_ping, s.query_timeout) == (
        8,
        0,
        2.5,
        0,
        False,
        0.0,
    )
    assert s.engine_options() == {
        "pool_size": 8,
        "max_overflow": 0,
        "pool_timeout": 2.5,
        "pool_recycle": -1,
        "pool_pre_ping": False,
    }


def test_middleware_options_carry_the_budget_topology() -> None:
    env = {"WEB_CONCURRENCY": "4", "DB_HOSTS": "3", "DB_PGBOUNCER": "transaction", "DB_PGBOUNCER_POOL_SIZE": "40"}
    assert PoolSettings.from_env(env).middleware_options() == {
        "leak_threshold": None,
        "retry_after": 1,
        "max_pending": None,
        "workers": 4,
        "hosts": 3,
        "pgbouncer": "transaction",
        "pgbouncer_pool_size": 40,
        "stats_path": "/api/system/database/pool",
        "stats_token": None,
        "monitor_interval": 60.0,
        "shutdown_timeout": 10.0,
        "startup_timeout": 10.0,
        "production": False,
    }
    unset = PoolSettings.from_env({}).middleware_options()
    # pgbouncer None (not "off"): the middleware may still report a connection pooler it finds in front
    assert (unset["workers"], unset["hosts"], unset["pgbouncer"], unset["pgbouncer_pool_size"]) == (
        None,
        1,
        None,
        None,
    )


@pytest.mark.parametrize("spelling", ["1", "true", "TRUE", "yes", "on", " True "])
def test_true_spellings(spelling: str) -> None:
    assert PoolSettings.from_env({"DB_POOL_PRE_PING": spelling}).pool_pre_ping is True


@pytest.mark.parametrize("spelling", ["0", "false", "No", "off"])
def test_false_spellings(spelling: str) -> None:
    assert PoolSettings.from_env({"DB_POOL_PRE_PING": spelling}).pool_pre_ping is False


@pytest.mark.parametrize(("variable", "value", "reason"), BAD)
def test_bad_values_name_the_variable_and_the_value(variable: str, value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        PoolSettings.from_env({variable: value})
    message = str(info.value)
    expected_value = value if "URL" not in variable else value.replace(":p@", ":***@")
    assert message.startswith(f"{variable}={expected_value!r} ")
    assert reason in message
    assert isinstance(info.value, ValueError)


def test_url_errors_mask_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        PoolSettings.from_env({"ASYNC_DATABASE_URL": "mysql://app:hunter2@db/app"})
    assert "hunter2" not in str(info.value)
    assert "app:***@db" in str(info.value)


def test_typed_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match=r"^pool_size=-3 is out of range; set it to an integer from 1 to 10000\.$"):
        PoolSettings(pool_size=-3)


@settings(max_examples=300, deadline=None)
@given(
    variable=st.sampled_from(
        [
            "DB_POOL_SIZE",
            "DB_MAX_OVERFLOW",
            "DB_POOL_TIMEOUT",
            "DB_POOL_RECYCLE",
            "DB_POOL_PRE_PING",
            "DB_QUERY_TIMEOUT",
            "ENVIRONMENT",
            "ASYNC_DATABASE_URL",
            "DATABASE_URL",
            "WEB_CONCURRENCY",
            "DB_HOSTS",
            "DB_PGBOUNCER",
            "DB_PGBOUNCER_POOL_SIZE",
        ]
    ),
    value=st.text(),
)
def test_any_string_is_accepted_or_a_config_error(variable: str, value: str) -> None:
    try:
        PoolSettings.from_env({variable: value})
    except ConfigError as exc:
        message = str(exc)
    else:
        return
    assert message.startswith(f"{variable}=")


def test_missing_urls_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="No database URL is set"):
        PoolSettings.from_env({}).create_async_engine()
    with pytest.raises(ConfigError, match="DATABASE_URL is not set"):
        PoolSettings.from_env({}).create_sync_engine()


def test_off_means_off_and_unset_means_not_said() -> None:
    """(f) DB_PGBOUNCER=off reaches the middleware as "off" (no pooler detection); unset stays "not said"."""
    assert PoolSettings.from_env({"DB_PGBOUNCER": "off"}).middleware_options()["pgbouncer"] == "off"
    assert PoolSettings.from_env({}).middleware_options()["pgbouncer"] is None
    assert PoolSettings.from_env({"DB_PGBOUNCER": "Transaction"}).middleware_options()["pgbouncer"] == "transaction"


def test_settings_repr_masks_the_password() -> None:
    """(g)"""
    settings = PoolSettings.from_env(
        {
            "DATABASE_URL": "postgresql://app:s3cret@db:5432/app",
            "ASYNC_DATABASE_URL": "postgresql+asyncpg://app:s3cret@db:5432/app",
        }
    )
    text_ = repr(settings)
    assert "s3cret" not in text_
    assert "database_url='postgresql://app:***@db:5432/app'" in text_
    assert "async_database_url='postgresql+asyncpg://app:***@db:5432/app'" in text_
    assert text_.startswith("PoolSettings(environment='development', pool_size=10,")


def test_the_middlewares_own_options_come_from_the_environment_too() -> None:
    settings = PoolSettings.from_env(
        {
            "DB_POOL_STATS_PATH": "/internal/pool/",
            "DB_POOL_STATS_TOKEN": "s3cret-token",
            "DB_POOL_MONITOR_INTERVAL": "15",
            "DB_POOL_SHUTDOWN_TIMEOUT": "20",
            "DB_POOL_STARTUP_TIMEOUT": "3",
        }
    )
    options = settings.middleware_options()
    assert {k: options[k] for k in ("stats_path", "stats_token", "monitor_interval")} == {  # type: ignore[literal-required]
        "stats_path": "/internal/pool/",
        "stats_token": "s3cret-token",
        "monitor_interval": 15.0,
    }
    assert (options["shutdown_timeout"], options["startup_timeout"], options["production"]) == (20.0, 3.0, False)
    assert "s3cret-token" not in repr(settings)
    assert PoolSettings.from_env({"DB_POOL_STATS_PATH": "off"}).middleware_options()["stats_path"] is None
    with pytest.raises(ConfigError, match=r"^DB_POOL_SHUTDOWN_TIMEOUT='0' is out of range"):
        PoolSettings.from_env({"DB_POOL_SHUTDOWN_TIMEOUT": "0"})


async def test_settings_carry_the_overload_options() -> None:
    settings = PoolSettings.from_env({"DB_POOL_RETRY_AFTER": "5", "DB_POOL_MAX_PENDING": "8"})
    options = settings.middleware_options()
    assert (options["leak_threshold"], options["retry_after"], options["max_pending"]) == (None, 5, 8)


def test_the_setting_is_validated() -> None:
    from asgi_dbpool import ConfigError

    with pytest.raises(ConfigError, match="DB_PGBOUNCER='statement' is not a PgBouncer pooling mode"):
        PoolSettings.from_env({"DB_PGBOUNCER": "statement"})
