"""Every app-level setting has a range that works end to end, checked when the Bulkhead is built."""

from __future__ import annotations

import math
from typing import Any

import pytest
from celery import Celery

from celery_bulkhead import Bulkhead, ConfigurationError, Pool
from celery_bulkhead.settings import MAX_PUBLISH_TIMEOUT


def make(broker: str = "memory://", **conf: Any) -> Celery:
    app = Celery("settings", broker=broker, set_as_current=False)
    app.conf.update(conf)
    return app


@pytest.mark.parametrize(
    "value",
    # 1e10 used to be accepted, then every Redis publish failed with OverflowError
    # from sock.settimeout; 10**400 raised OverflowError instead of ConfigurationError.
    [0, -1, 1e10, MAX_PUBLISH_TIMEOUT + 1, 10**400, math.inf, math.nan, True, "10"],
)
def test_publish_timeout_out_of_range_is_a_configuration_error(value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        Bulkhead(make(bulkhead_publish_timeout=value), pools=[Pool("p")])
    assert info.value.setting == "bulkhead_publish_timeout"
    assert "a number of seconds > 0 and <= 3600" in str(info.value)


def test_publish_timeout_argument_is_checked_like_the_setting() -> None:
    with pytest.raises(ConfigurationError, match="bulkhead_publish_timeout"):
        Bulkhead(make(), pools=[Pool("p")], publish_timeout=10**400)


def test_publish_timeout_at_the_top_of_its_range_becomes_the_redis_socket_timeout() -> None:
    app = make("redis://127.0.0.1:6379/9", bulkhead_publish_timeout=MAX_PUBLISH_TIMEOUT)
    bulkhead = Bulkhead(app, pools=[Pool("p")])
    assert bulkhead.publish_timeout == MAX_PUBLISH_TIMEOUT
    assert app.conf.broker_transport_options["socket_timeout"] == MAX_PUBLISH_TIMEOUT


@pytest.mark.parametrize("value", [0, -1, 65536, 2**70, 1.5, "9808", True])
def test_metrics_port_must_be_a_tcp_port(value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        Bulkhead(make(bulkhead_metrics_port=value), pools=[Pool("p")])
    assert info.value.setting == "bulkhead_metrics_port"


def test_every_pools_metrics_port_must_be_a_tcp_port() -> None:
    """65535 with two pools used to give the second pool port 65536 (a crash-looping worker)."""
    with pytest.raises(ConfigurationError) as info:
        Bulkhead(make(bulkhead_metrics_port=65535), pools=[Pool("a"), Pool("b")])
    assert info.value.value == 65535
    assert "a TCP port <= 65534 with 2 pools" in str(info.value)
    bulkhead = Bulkhead(make(bulkhead_metrics_port=65534), pools=[Pool("a"), Pool("b")])
    assert [bulkhead.metrics_port_of(p) for p in bulkhead.pools] == [65534, 65535]


@pytest.mark.parametrize("value", ["", "   ", 7, ["127.0.0.1"]])
def test_metrics_host_must_be_a_host(value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        Bulkhead(make(bulkhead_metrics_host=value), pools=[Pool("p")])
    assert info.value.setting == "bulkhead_metrics_host"


def test_pools_setting_must_be_pools() -> None:
    with pytest.raises(ConfigurationError, match="bulkhead_pools"):
        Bulkhead(make(bulkhead_pools="payments"))
    with pytest.raises(ConfigurationError, match="no pools declared"):
        Bulkhead(make())
    with pytest.raises(ConfigurationError, match="at least one pool"):
        Bulkhead(make(bulkhead_pools={}))


def test_pools_setting_accepts_any_iterable_of_pools() -> None:
    bulkhead = Bulkhead(make(), pools=iter([Pool("a"), Pool("b")]))
    assert [p.name for p in bulkhead.pools] == ["a", "b"]


def test_pool_values_at_the_top_of_every_range_are_accepted() -> None:
    pool = Pool(
        "edge",
        concurrency=10_000,
        max_queue=2**31 - 1,
        prefetch_multiplier=65_535,
        block_timeout=3600,
        time_limit=604_800,
        soft_time_limit=604_799.5,
        drain_timeout=86_400,
    )
    assert pool.max_queue == 2**31 - 1


@pytest.mark.parametrize("broker", ["sqs://", "filesystem://"])
def test_a_capped_pool_on_a_transport_without_exact_caps_is_refused_at_build(broker: str) -> None:
    """Before: accepted here and by `bulkhead plan`; the web process's first delay() raised."""
    with pytest.raises(ConfigurationError) as info:
        Bulkhead(make(broker), pools=[Pool("p", max_queue=5)])
    assert (info.value.pool, info.value.setting, info.value.value) == ("p", "max_queue", 5)
    assert "cannot cap a queue exactly" in str(info.value)
    Bulkhead(make(broker), pools=[Pool("p")])  # no cap: nothing to enforce, accepted
