"""Tenant limits without a broker: the config model, untrusted ids, keys and GCRA itself."""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import time
import unicodedata
from typing import Any

import pytest

from celery_bulkhead import ConfigurationError, Pool, TenantLimit
from celery_bulkhead.tenants import (
    MAX_TENANT_BYTES,
    bucket_key,
    lease_key,
    parse_rate,
    tenant_id,
)
from celery_bulkhead.tenants.bucket import Take, take

# -- TenantLimit: every bad value refused at construction, naming the setting ----------

BAD_SETTINGS: list[tuple[dict[str, Any], str]] = [
    *[({"key": key, "rate": 1}, "tenant.key") for key in (None, 5, "", "  ", "header:", b"t")],
    *[
        ({"key": "t", "rate": rate}, "tenant.rate")
        for rate in (
            0,
            0.0,
            -1,
            -0.5,
            "0/s",
            "-5/s",
            "x/s",
            "10/d",
            "/s",
            "",
            "10/s/s",
            "ten per second",
            10**400,
            "1e400/s",
            math.nan,
            "nan/s",
            math.inf,
            "inf/s",
            True,
            False,
            [10],
            {"per": "s"},
            2_000_000,  # above 1e6/s
            1e-9,  # so slow a full bucket would overflow Redis's 64-bit microseconds
        )
    ],
    *[
        ({"key": "t", "rate": 10, "burst": burst}, "tenant.burst")
        for burst in (0, -1, True, 1.5, "2", math.nan, 10**7)
    ],
    *[
        ({"key": "t", "max_inflight": cap}, "tenant.max_inflight")
        for cap in (0, -1, True, 1.5, "2", 100_001)
    ],
    *[
        ({"key": "t", "rate": 1, "on_limited": value}, "tenant.on_limited")
        for value in ("queue", "block", None, "", "REJECT", ["drop"])
    ],
    *[
        ({"key": "t", "rate": 1, "enforce": value}, "tenant.enforce")
        for value in ("producer", None, "", True)
    ],
    *[
        ({"key": "t", "rate": 1, "on_state_error": value}, "tenant.on_state_error")
        for value in ("ignore", None, True, "")
    ],
    *[
        ({"key": "t", "rate": 1, "max_deferrals": value}, "tenant.max_deferrals")
        for value in (-1, 1001, True, 1.5, "3", None)
    ],
    *[
        ({"key": "t", "rate": 1, "max_defer": value}, "tenant.max_defer")
        for value in (0, -1, 3601, math.nan, math.inf, True, "10", None)
    ],
    ({"key": "t"}, "tenant.rate"),  # neither rate nor max_inflight: no limit at all
    ({"key": "t", "rate": None, "max_inflight": None}, "tenant.rate"),
    ({"key": "t", "rate": 1, "burstt": 3}, "tenant.burstt"),  # a typo is not ignored
    ({"key": "t", "rate": 1, "queue": "x"}, "tenant.queue"),
]


@pytest.mark.parametrize(("settings", "setting"), BAD_SETTINGS)
def test_a_bad_setting_is_refused_naming_the_setting(
    settings: dict[str, Any], setting: str
) -> None:
    settings = dict(settings)
    key = settings.pop("key")
    with pytest.raises(ConfigurationError) as error:
        TenantLimit(key, **settings)
    assert error.value.setting == setting
    assert f"invalid {setting}=" in str(error.value)
    assert error.value.allowed  # and it says what would have been allowed


@pytest.mark.parametrize(
    ("rate", "per_second"),
    [
        ("10/s", 10.0),
        ("600/m", 10.0),
        ("3600/h", 1.0),
        ("1/h", 1 / 3600),
        ("0.5/s", 0.5),
        (" 10 / S ", 10.0),
        ("10", 10.0),
        (10, 10.0),
        (2.5, 2.5),
        ("1000000/s", 1_000_000.0),
    ],
)
def test_rates_are_per_second_from_celerys_forms(rate: Any, per_second: float) -> None:
    assert parse_rate(rate) == pytest.approx(per_second)
    limit = TenantLimit("tenant_id", rate=rate)
    assert limit.rate == pytest.approx(per_second)
    assert limit.interval == pytest.approx(1 / per_second)


@pytest.mark.parametrize(
    ("rate", "burst"),
    [("10/s", 10), ("600/m", 10), (2.5, 3), ("1/h", 1), (0.2, 1), ("3600/h", 1)],
)
def test_the_default_burst_is_one_seconds_worth_and_at_least_one(rate: Any, burst: int) -> None:
    assert TenantLimit("t", rate=rate).burst == burst


def test_defaults_reject_at_submit_and_fail_open() -> None:
    limit = TenantLimit("tenant_id", rate="10/s")
    assert limit.on_limited == "reject"
    assert limit.enforce == "submit"
    assert limit.on_state_error == "allow"
    assert limit.max_inflight is None
    assert limit.max_deferrals == 10
    assert limit.max_defer == 300.0
    assert limit.at_submit and not limit.at_worker


def test_an_inflight_cap_alone_is_enforced_at_the_worker_only() -> None:
    limit = TenantLimit("header:X-Tenant", max_inflight=3)
    assert limit.rate is None and limit.burst is None
    assert limit.at_worker and not limit.at_submit


def test_where_the_rate_is_checked_follows_enforce() -> None:
    assert TenantLimit("t", rate=1, enforce="worker").at_worker
    assert not TenantLimit("t", rate=1, enforce="worker").at_submit
    both = TenantLimit("t", rate=1, enforce="both")
    assert both.at_submit and both.at_worker


def test_a_tenant_limit_is_immutable_and_compares_by_value() -> None:
    limit = TenantLimit("t", rate="600/m", burst=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        limit.rate = 1.0  # type: ignore[misc]
    assert limit == TenantLimit("t", rate=10, burst=4)
    assert TenantLimit.from_mapping({"key": "t", "rate": "10/s", "burst": 4}) == limit


@pytest.mark.parametrize(
    ("tenant", "setting"),
    [
        ({"key": "t", "rate": "x/s"}, "tenant.rate"),
        ({"key": "t", "rate": 1, "burst": 0}, "tenant.burst"),
        ({"key": "t", "rate": 1, "on_limited": "queue"}, "tenant.on_limited"),
        ({"key": "t", "rate": 1, "bogus": 1}, "tenant.bogus"),
        ({"key": "t"}, "tenant.rate"),
        ({"rate": "10/s"}, "tenant"),  # no key
        ("10/s", "tenant"),
        (5, "tenant"),
    ],
)
def test_a_pool_tenant_mapping_error_names_the_pool(tenant: Any, setting: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        Pool("billing", tenant=tenant)
    assert error.value.pool == "billing"
    assert error.value.setting == setting
    assert str(error.value).startswith("pool 'billing': ")


def test_a_pool_takes_a_tenant_mapping() -> None:
    pool = Pool("billing", tenant={"key": "account", "rate": "600/m", "max_inflight": 2})
    assert pool.tenant == TenantLimit("account", rate=10, max_inflight=2)


# -- tenant ids: untrusted input ---------------------------------------------------


BAD_IDS: list[Any] = [
    None,
    True,
    False,
    1.0,
    7.5,
    math.nan,
    b"acme",
    bytearray(b"acme"),
    ["acme"],
    ("acme",),
    {"acme": 1},
    object(),
    "",
    "a" * (MAX_TENANT_BYTES + 1),
    "\u00e9" * 64 + "a",  # 129 bytes: 2-byte characters at the edge
    "\u20ac" * 42 + "abc",  # 129 bytes: 3-byte characters
    "\U0001f600" * 32 + "a",  # 129 bytes: 4-byte characters
    "x" * 100_000,
    10**128,  # 129 digits
    -(10**127),  # "-" and 128 digits
    10**5000,  # would not even convert with str()
    "\ud800",  # a lone surrogate: not encodable, not a tenant
    "acme\udfff",
]


@pytest.mark.parametrize("value", BAD_IDS, ids=lambda v: type(v).__name__)
def test_a_bad_tenant_id_is_refused(value: Any) -> None:
    started = time.perf_counter()
    with pytest.raises(ConfigurationError) as error:
        tenant_id(value, "shop.charge")
    assert time.perf_counter() - started < 0.1  # even for absurd values: cheap
    assert error.value.setting == "tenant id"
    assert "shop.charge" in str(error.value)


SECRET = "s3cr3t-tenant"


@pytest.mark.parametrize(
    "value",
    [
        f"{SECRET}\nX-Injected: 1",
        f"{SECRET}\r\n",
        f"{SECRET}\x00",
        f"{SECRET}\x1b[31m",
        f"{SECRET}\x7f",
        f"{SECRET}\t",
        f"{SECRET}\x85",  # NEL
        f"{SECRET}\u2028",  # LINE SEPARATOR
        f"{SECRET}\u2029",  # PARAGRAPH SEPARATOR
        f"{SECRET}\ud800",
        SECRET * 20,  # too long
    ],
    ids=repr,
)
def test_a_refused_id_is_never_repeated_in_the_error(value: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        tenant_id(value, "shop.charge")
    for text in (str(error.value), repr(error.value), repr(error.value.args)):
        assert SECRET not in text
        assert repr(value) not in text
    assert error.value.value == "<str>"


@pytest.mark.parametrize(
    "value",
    [
        "a" * MAX_TENANT_BYTES,
        "\u00e9" * 64,  # exactly 128 bytes of 2-byte characters
        "\u20ac" * 42 + "ab",  # 128 bytes of 3-byte characters
        "\U0001f600" * 32,  # 128 bytes of 4-byte characters
        "e\u0301" * 64,  # 192 bytes decomposed, 128 once NFC-normalised
        "acme corp",
        "a:b",
        "{acme}",
        "*",
        "Ölwerk GmbH",
        "東京",
        "-5",
    ],
)
def test_a_good_tenant_id_passes_normalised(value: str) -> None:
    tenant = tenant_id(value)
    assert tenant == unicodedata.normalize("NFC", value)
    assert len(tenant.encode("utf-8")) <= MAX_TENANT_BYTES


def test_an_int_is_its_decimal_string() -> None:
    class Plan(enum.IntEnum):
        GOLD = 7

    assert tenant_id(7) == tenant_id("7") == tenant_id(Plan.GOLD) == "7"
    assert tenant_id(-5) == "-5"
    assert tenant_id(10**127) == "1" + "0" * 127  # 128 digits: the longest
    assert bucket_key("p", tenant_id(7)) == bucket_key("p", tenant_id("7"))


def test_composed_and_decomposed_forms_are_one_tenant() -> None:
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert composed != decomposed
    assert tenant_id(composed) == tenant_id(decomposed)
    assert bucket_key("p", tenant_id(composed)) == bucket_key("p", tenant_id(decomposed))
    assert lease_key("p", tenant_id(composed)) == lease_key("p", tenant_id(decomposed))


# -- keys: a digest of the id, one hash tag, never a collision ---------------------------

AWKWARD = ["a:b", "a", "b", "{x}", "x}", "{x", "*", "?", "[a]", "a b", "", "}{", "p:a"]


def test_keys_carry_a_digest_never_the_id() -> None:
    for tenant in AWKWARD:
        for key, suffix in ((bucket_key("p", tenant), "rate"), (lease_key("p", tenant), "leases")):
            # One intact {hash tag}: the pool and a fixed-length hex digest of the id.
            match = re.fullmatch(r"bulkhead:\{p:([0-9a-f]{24})\}:(\w+)", key)
            assert match is not None, key
            assert match.group(2) == suffix
            assert match.group(1) != tenant


def test_keys_of_different_tenants_and_pools_never_collide() -> None:
    keys = [
        make(pool, tenant)
        for make in (bucket_key, lease_key)
        for pool in ("p", "p:a", "q")
        for tenant in AWKWARD
    ]
    assert len(set(keys)) == len(keys)
    assert bucket_key("p", "a:b") != bucket_key("p:a", "b")
    assert bucket_key("p", "a}b") != bucket_key("p", "a{b")
    assert bucket_key("p", "a") != lease_key("p", "a")


def test_a_key_has_a_fixed_length_whatever_the_id() -> None:
    assert len({len(bucket_key("p", t)) for t in ("a", "x" * 128, "東京", "a:b")}) == 1


# -- GCRA against a reference token bucket ---------------------------------------------


class ReferenceBucket:
    """The textbook token bucket: ``burst`` tokens, refilled continuously at ``rate``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.last: float | None = None

    def take(self, now: float) -> tuple[bool, float]:
        if self.last is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1 - 1e-9:
            self.tokens -= 1
            return True, 0.0
        return False, (1 - self.tokens) / self.rate


class Stored:
    """GCRA with its stored ``tat``, as a store keeps it."""

    def __init__(self, interval: float, burst: int) -> None:
        self.interval, self.burst = interval, burst
        self.tat: float | None = None

    def take(self, now: float, horizon: float = 0.0) -> Take:
        result = take(self.tat, now, self.interval, self.burst, horizon)
        if result.allowed:
            self.tat = result.tat
        else:
            assert result.tat == (now if self.tat is None else self.tat)  # unchanged
        return result


# Rate 4/s: an interval of 0.25 s, exact in binary, so the models agree to the bit.
TIMES = [
    0.0, 0.0, 0.0, 0.0, 0.0,
    0.1, 0.2, 0.25, 0.25, 0.3,
    0.5, 0.74, 0.75, 1.0, 1.0,
    2.0, 2.0, 2.0, 2.0,
    2.1, 2.2, 2.3,
    10.0, 10.0, 10.0, 10.0, 10.0, 10.0,
]  # fmt: skip


@pytest.mark.parametrize("burst", [1, 2, 4])
def test_gcra_matches_a_token_bucket_over_hand_picked_times(burst: int) -> None:
    gcra, reference = Stored(0.25, burst), ReferenceBucket(4.0, burst)
    for now in TIMES:
        got = gcra.take(now)
        allowed, retry_after = reference.take(now)
        assert got.allowed == allowed, f"at t={now}"
        assert got.wait == pytest.approx(retry_after, abs=1e-9), f"at t={now}"


def test_a_full_bucket_admits_the_burst_at_once_then_one_per_interval() -> None:
    bucket = Stored(0.25, 3)
    assert [bucket.take(0.0).allowed for _ in range(4)] == [True, True, True, False]
    refused = bucket.take(0.0)
    assert not refused.allowed and refused.wait == 0.25  # retry_after: exactly one interval
    assert not bucket.take(0.249).allowed
    assert bucket.take(0.25) == Take(True, 1.0, 0.0)
    assert not bucket.take(0.25).allowed
    for k in range(2, 10):  # then exactly one per interval
        assert bucket.take(0.25 * k).allowed
        refused = bucket.take(0.25 * k)
        assert not refused.allowed and refused.wait == 0.25


def test_retry_after_is_the_exact_time_to_the_next_token() -> None:
    bucket = Stored(0.25, 2)
    bucket.take(0.0), bucket.take(0.0)
    for now in (0.0, 0.05, 0.125, 0.2):
        refused = bucket.take(now)
        assert not refused.allowed and refused.wait == pytest.approx(0.25 - now)
        assert bucket.take(now + refused.wait).allowed
        bucket.tat = 0.5  # back to the empty bucket of t=0 for the next case


def test_an_idle_tenant_gets_a_full_bucket_never_more() -> None:
    bucket = Stored(0.25, 3)
    for _ in range(3):
        bucket.take(0.0)
    later = 1000.0
    assert [bucket.take(later).allowed for _ in range(4)] == [True, True, True, False]


def test_reservations_within_the_horizon_are_spaced_at_the_interval() -> None:
    bucket = Stored(0.25, 2)
    waits = [bucket.take(0.0, horizon=1.0) for _ in range(6)]
    assert all(t.allowed for t in waits)
    assert [t.wait for t in waits] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0]
    tat = bucket.tat
    beyond = bucket.take(0.0, horizon=1.0)
    assert not beyond.allowed and beyond.wait == 1.25  # retry_after of the refusal
    assert bucket.tat == tat  # a refused reservation takes nothing
    again = bucket.take(0.0, horizon=1.0)
    assert not again.allowed and again.wait == 1.25
    # Time passing brings reservations back within the horizon, one per interval.
    assert bucket.take(0.25, horizon=1.0) == Take(True, tat + 0.25, 1.0)


def test_a_new_tenant_refused_beyond_the_horizon_stores_nothing() -> None:
    # burst 1 and no horizon: the second request at the same instant is refused.
    result = take(None, 5.0, 0.25, 1, 0.0)
    assert result == Take(True, 5.25, 0.0)
    refused = take(result.tat, 5.0, 0.25, 1, 0.0)
    assert refused == Take(False, 5.25, 0.25)


# -- where the id comes from ---------------------------------------------------------


def test_the_tenant_comes_from_a_kwarg_a_header_or_a_callable() -> None:
    by_kwarg = TenantLimit("account", rate=1)
    assert by_kwarg.tenant_of((), {"account": 7}, None, "t") == "7"
    by_header = TenantLimit("header:X-Tenant", rate=1)
    assert by_header.tenant_of((), {}, {"X-Tenant": "cafe\u0301"}, "t") == "caf\u00e9"
    by_callable = TenantLimit(lambda args, kwargs: args[0]["org"], rate=1)
    assert by_callable.tenant_of(({"org": "acme"},), {}, None, "t") == "acme"


@pytest.mark.parametrize(
    ("limit", "args", "kwargs", "headers"),
    [
        (TenantLimit("account", rate=1), (), {}, None),  # kwarg missing
        (TenantLimit("account", rate=1), ("acme",), None, None),
        (TenantLimit("account", rate=1), (), {"account": None}, None),
        (TenantLimit("header:X-Tenant", rate=1), (), {}, None),  # header missing
        (TenantLimit("header:X-Tenant", rate=1), (), {}, {"X-Tenant": "a\nb"}),
        (TenantLimit(lambda a, k: a[5], rate=1), (), {}, None),  # the callable raises
        (TenantLimit(lambda a, k: 1.5, rate=1), (), {}, None),  # ... or returns a non-id
    ],
)
def test_a_missing_or_bad_tenant_is_a_configuration_error(
    limit: TenantLimit, args: Any, kwargs: Any, headers: Any
) -> None:
    with pytest.raises(ConfigurationError) as error:
        limit.tenant_of(args, kwargs, headers, "shop.charge")
    assert error.value.setting in ("tenant.key", "tenant id")
    assert "shop.charge" in str(error.value)


def test_a_new_tenants_first_request_is_never_refused_by_rounding() -> None:
    """``new_tat - burst * interval - now`` came out at ~4e-10 for some ``now``: a refusal."""
    import random

    rng = random.Random(7)
    for _ in range(100_000):
        now = rng.uniform(1e3, 2e9)
        first = take(None, now, interval=3600.0, burst=1)
        assert first.allowed and first.wait == 0, now
