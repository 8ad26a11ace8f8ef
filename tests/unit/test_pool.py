"""The pool model: every bad value is refused at construction, with a clear message."""

from __future__ import annotations

import math
from typing import Any

import pytest

from celery_bulkhead import ConfigurationError, Pool
from celery_bulkhead.pool import pools_from_setting


def test_defaults_are_safe_for_isolation() -> None:
    pool = Pool("io")
    assert pool.queue == "bulkhead.io"
    assert pool.concurrency == 1
    assert pool.prefetch_multiplier == 1  # a hung task holds no extra messages
    assert pool.acks_late is True  # a worker killed mid-task loses nothing
    assert pool.max_queue is None
    assert pool.on_full == "reject"
    assert pool.drain_timeout == 30.0
    assert pool.worker_pool == "prefork"


def test_pool_is_immutable() -> None:
    pool = Pool("io", concurrency=4)
    with pytest.raises(AttributeError):
        pool.concurrency = 8  # type: ignore[misc]


def test_settings_are_normalised() -> None:
    pool = Pool("io", tasks=["a.*", "b.*"], time_limit=30, soft_time_limit=20, drain_timeout=5)
    assert pool.tasks == ("a.*", "b.*")
    assert pool.time_limit == 30.0 and isinstance(pool.time_limit, float)
    assert pool.soft_time_limit == 20.0
    assert pool == Pool(
        "io", tasks=("a.*", "b.*"), time_limit=30.0, soft_time_limit=20.0, drain_timeout=5.0
    )


BAD: list[tuple[str, Any, str]] = [
    ("concurrency", 0, "an int >= 1 and <= 10000"),
    ("concurrency", -3, "an int >= 1 and <= 10000"),
    ("concurrency", True, "an int >= 1 and <= 10000"),
    ("concurrency", "4", "an int >= 1 and <= 10000"),
    ("concurrency", 2.5, "an int >= 1 and <= 10000"),
    ("concurrency", 10_001, "an int >= 1 and <= 10000"),
    ("max_queue", 0, "an int >= 1 and <= 2147483647 or None"),
    ("max_queue", False, "an int >= 1 and <= 2147483647 or None"),
    ("max_queue", "1000", "an int >= 1 and <= 2147483647 or None"),
    # RabbitMQ's x-max-length is a signed 32-bit field: 2**63 used to fail in struct.pack.
    ("max_queue", 2**31, "an int >= 1 and <= 2147483647 or None"),
    ("max_queue", 2**63, "an int >= 1 and <= 2147483647 or None"),
    ("prefetch_multiplier", 0, "an int >= 1 and <= 65535"),
    ("prefetch_multiplier", 65_536, "an int >= 1 and <= 65535"),
    ("on_full", "spill", "one of reject, drop, block"),
    ("on_full", None, "one of reject, drop, block"),
    ("block_timeout", 0, "a number of seconds > 0 and <= 3600"),
    ("block_timeout", math.nan, "a number of seconds > 0 and <= 3600"),
    ("block_timeout", math.inf, "a number of seconds > 0 and <= 3600"),
    ("block_timeout", "5", "a number of seconds > 0 and <= 3600"),
    ("block_timeout", 3600.5, "a number of seconds > 0 and <= 3600"),
    # An int too large for a float used to raise OverflowError, not ConfigurationError.
    ("block_timeout", 10**400, "a number of seconds > 0 and <= 3600"),
    ("time_limit", -1, "a number of seconds > 0 and <= 604800 or None"),
    ("time_limit", True, "a number of seconds > 0 and <= 604800 or None"),
    ("time_limit", 10**400, "a number of seconds > 0 and <= 604800 or None"),
    ("soft_time_limit", math.nan, "a number of seconds > 0 and <= 604800 or None"),
    ("soft_time_limit", -(10**400), "a number of seconds > 0 and <= 604800 or None"),
    ("drain_timeout", 0, "a number of seconds > 0 and <= 86400"),
    ("drain_timeout", None, "a number of seconds > 0 and <= 86400"),
    ("drain_timeout", 1e300, "a number of seconds > 0 and <= 86400"),
    ("acks_late", "yes", "True or False"),
    ("acks_late", 1, "True or False"),
    ("worker_pool", "processes", "one of prefork, threads, solo, gevent, eventlet"),
    ("tasks", "reports.*", "a list of task-name glob patterns"),
    ("tasks", ["ok.*", 3], "a list of task-name glob patterns"),
    ("tasks", ["a b"], "a list of task-name glob patterns"),
    ("tasks", ["a.*", "a.*"], "each pattern once"),
    ("queue", "has space", "a queue name"),
    ("queue", 7, "a queue name"),
]


@pytest.mark.parametrize(
    ("setting", "value", "allowed"), BAD, ids=[f"{s}={v!r}"[:60] for s, v, _ in BAD]
)
def test_bad_value_names_pool_setting_value_and_what_is_allowed(
    setting: str, value: Any, allowed: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        Pool("webhooks", **{setting: value})
    error = info.value
    assert (error.pool, error.setting) == ("webhooks", setting)
    assert (
        error.value is value
        or error.value == value
        or (isinstance(value, float) and math.isnan(value))
    )
    message = str(error)
    assert message.startswith(f"pool 'webhooks': invalid {setting}=")
    assert allowed in message


@pytest.mark.parametrize("name", ["", "has space", "a@b", "-lead", "x" * 64, 5, None])
def test_bad_pool_name_is_refused(name: Any) -> None:
    with pytest.raises(ConfigurationError, match="invalid name=") as info:
        Pool(name)
    assert info.value.setting == "name"


def test_unknown_setting_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        Pool("io", concurency=4)
    assert info.value.setting == "concurency"
    assert "unknown setting" in str(info.value)
    assert "concurrency" in info.value.allowed


def test_soft_time_limit_must_be_below_time_limit() -> None:
    with pytest.raises(ConfigurationError, match="a value below time_limit=10"):
        Pool("io", time_limit=10, soft_time_limit=10)


@pytest.mark.parametrize("worker_pool", ["threads", "solo"])
def test_time_limits_are_refused_where_celery_cannot_enforce_them(worker_pool: str) -> None:
    with pytest.raises(ConfigurationError, match="does not enforce time limits") as info:
        Pool("io", worker_pool=worker_pool, time_limit=30)
    assert info.value.setting == "time_limit"
    Pool("io", worker_pool=worker_pool)  # fine without limits


def test_pools_from_a_settings_mapping() -> None:
    pools = pools_from_setting(
        {"payments": {"concurrency": 4, "time_limit": 30}, "reports": {"tasks": ["reports.*"]}}
    )
    assert [p.name for p in pools] == ["payments", "reports"]
    assert pools[0].concurrency == 4 and pools[1].tasks == ("reports.*",)


def test_pools_from_a_list_of_pools_and_mappings() -> None:
    pools = pools_from_setting([Pool("a"), {"name": "b", "concurrency": 2}])
    assert [(p.name, p.concurrency) for p in pools] == [("a", 1), ("b", 2)]


def test_unknown_key_in_settings_mapping_names_the_pool() -> None:
    with pytest.raises(ConfigurationError) as info:
        pools_from_setting({"payments": {"concurrency": 4, "max_queu": 10}})
    assert (info.value.pool, info.value.setting) == ("payments", "max_queu")


@pytest.mark.parametrize("value", ["payments", 42, [42], {"payments": 4}])
def test_malformed_settings_are_refused(value: Any) -> None:
    with pytest.raises(ConfigurationError):
        pools_from_setting(value)
