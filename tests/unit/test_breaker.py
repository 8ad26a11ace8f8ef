"""The breaker's contract, without a broker: settings, what a failure is, the pure state
machine on hand-worked sequences, and the per-process circuit on a fake clock.

Times in the machine tests are milliseconds, as the stores pass them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import pybreaker
import pytest
from billiard.einfo import ExceptionWithTraceback
from celery import Celery
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded, TimeLimitExceeded

import celery_bulkhead.breaker.circuit as circuit_module
from celery_bulkhead import Breaker, Bulkhead, CircuitOpen, ConfigurationError, Pool
from celery_bulkhead.breaker import CLOSED, HALF_OPEN, OPEN, Circuit, machine
from celery_bulkhead.breaker.memory import MemoryBreakerStore
from celery_bulkhead.worker.gate import DEFERRALS, WorkerGate


class Downstream(Exception):
    """A downstream failure."""


class ClientError(Exception):
    """A 4xx: the request's fault, not the downstream's."""


class Listener(pybreaker.CircuitBreakerListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.changes: list[tuple[str, str]] = []
        self.breakers: list[Any] = []

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.breakers.append(cb)
        self.changes.append((old_state.name, new_state.name))


class BrokenListener(pybreaker.CircuitBreakerListener):  # type: ignore[misc]
    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        raise RuntimeError("a broken listener")


# -- settings -------------------------------------------------------------------------


def test_defaults_match_the_documentation() -> None:
    breaker = Breaker()
    assert (breaker.fail_max, breaker.reset_timeout, breaker.failure_window) == (5, 30.0, 60.0)
    assert (breaker.exclude, breaker.include, breaker.name) == ((), (), None)
    assert breaker.half_open_max_calls == 1
    assert breaker.on_open == "defer" and breaker.on_state_error == "closed"
    assert breaker.fail_fast_at_submit is False
    assert breaker.cache_seconds == 1.0 and breaker.listeners == ()
    # The rate rules are off: today's fail_max breaker exactly.
    assert (breaker.failure_rate_threshold, breaker.slow_call_duration) == (None, None)
    assert (breaker.minimum_calls, breaker.slow_call_rate_threshold) == (10, 100.0)
    assert breaker.rates is None


def test_the_rate_window_is_ten_buckets_of_the_failure_window() -> None:
    rates = Breaker(failure_rate_threshold=50, failure_window=30, minimum_calls=4).rates
    assert rates == machine.Rates(bucket=3_000, minimum_calls=4, failure_rate=50.0, slow_rate=None)
    slow = Breaker(slow_call_duration=2, slow_call_rate_threshold=80).rates
    assert slow == machine.Rates(bucket=6_000, minimum_calls=10, failure_rate=None, slow_rate=80)
    assert Breaker(failure_window=0.001, failure_rate_threshold=1).rates.bucket == 1  # type: ignore[union-attr]
    # Settings that differ only in their rates are different breakers.
    assert Breaker(failure_rate_threshold=50) != Breaker(failure_rate_threshold=60)


def test_settings_are_normalised_and_immutable() -> None:
    listener = Listener()
    breaker = Breaker(
        fail_max=2,
        reset_timeout=3,
        exclude=[ClientError],
        include=SoftTimeLimitExceeded,
        failure_window=10,
        cache_seconds=0.05,
        listeners=[listener],
        name="pay.v2-eu_1",
    )
    assert breaker.reset_timeout == 3.0 and isinstance(breaker.reset_timeout, float)
    assert breaker.exclude == (ClientError,)
    assert breaker.include == (SoftTimeLimitExceeded,)
    assert breaker.listeners == (listener,)
    assert breaker.failure_window == 10.0 and breaker.cache_seconds == 0.05
    with pytest.raises(AttributeError):
        breaker.fail_max = 3  # type: ignore[misc]
    assert Breaker.from_mapping({"fail_max": 2}) == Breaker(fail_max=2)


SECONDS = "a number of seconds > 0 and <= 86400"
BAD: list[tuple[str, Any]] = [
    *[("fail_max", v) for v in (0, -1, 100_001, 2.5, True, "5", None)],
    *[("reset_timeout", v) for v in (0, -1, 86_401, math.inf, math.nan, "30", True, None)],
    *[("failure_window", v) for v in (0, -0.5, 86_401, math.nan, "60", False)],
    *[("cache_seconds", v) for v in (0, 0.049, 60.5, -1, "1", None, math.inf)],
    *[("half_open_max_calls", v) for v in (0, 101, 1.0, "1", None)],
    *[("exclude", v) for v in ("ValueError", [ValueError, 1], 3, object, [int], {ValueError})],
    *[("include", v) for v in ("Retry", [Retry, "x"], None, [object])],
    *[("name", v) for v in ("", "a" * 64, "a b", "a:b", "{a}", "-a", ".a", "é", 5, b"a")],
    *[("on_open", v) for v in ("drop", "Defer", None, 1)],
    *[("on_state_error", v) for v in ("deny", "half-open", None, True)],
    *[("fail_fast_at_submit", v) for v in ("yes", 1, 0, None)],
    *[("listeners", v) for v in (object(), [object()], "abc", [Listener, 1], 5)],
    *[("failure_rate_threshold", v) for v in (0, -1, 100.1, math.nan, "50", True, 10**400)],
    *[("minimum_calls", v) for v in (0, 1_000_001, 2.0, "10", None, True)],
    *[("slow_call_duration", v) for v in (0, -1, 86_401, math.inf, "2", False)],
    *[("slow_call_rate_threshold", v) for v in (0, 101, math.nan, None, "100", True)],
]


@pytest.mark.parametrize(("setting", "value"), BAD)
def test_every_bad_value_is_refused_naming_the_setting(setting: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        Breaker(**{setting: value})
    assert info.value.setting == f"breaker.{setting}"
    assert info.value.pool is None
    assert f"breaker.{setting}" in str(info.value)


def test_an_unknown_setting_is_refused_naming_it() -> None:
    with pytest.raises(ConfigurationError) as info:
        Breaker(fail_maxx=3)
    assert info.value.setting == "breaker.fail_maxx"
    assert "fail_max" in info.value.allowed  # the allowed settings are listed


def test_the_limits_themselves_are_allowed() -> None:
    Breaker(fail_max=1, reset_timeout=86_400, half_open_max_calls=100, cache_seconds=60)
    Breaker(fail_max=100_000, half_open_max_calls=1, cache_seconds=0.05, name="a" * 63)
    Breaker(failure_rate_threshold=100, minimum_calls=1, slow_call_duration=86_400)
    Breaker(failure_rate_threshold=0.01, minimum_calls=1_000_000, slow_call_rate_threshold=0.01)
    Breaker(failure_rate_threshold=None, slow_call_duration=None)


def test_rate_errors_say_what_is_allowed() -> None:
    with pytest.raises(ConfigurationError) as info:
        Breaker(failure_rate_threshold=150)
    assert info.value.allowed == "a percentage > 0 and <= 100, or None (no failure-rate rule)"
    with pytest.raises(ConfigurationError) as info:
        Breaker(slow_call_duration=-2)
    assert info.value.allowed == (
        "a number of seconds > 0 and <= 86400, or None (no slow-call rule)"
    )
    with pytest.raises(ConfigurationError) as info:
        Breaker(slow_call_rate_threshold=0)
    assert info.value.allowed == "a percentage > 0 and <= 100"


@pytest.mark.parametrize(
    ("breaker", "setting"),
    [
        ({"fail_max": 0}, "breaker.fail_max"),
        ({"reset_timeout": -1}, "breaker.reset_timeout"),
        ({"on_open": "drop"}, "breaker.on_open"),
        ({"listeners": object()}, "breaker.listeners"),
        ({"bogus": 1}, "breaker.bogus"),
        ("on", "breaker"),
        (5, "breaker"),
    ],
)
def test_a_pools_breaker_mapping_errors_name_the_pool(breaker: Any, setting: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Pool("webhooks", breaker=breaker)
    assert info.value.pool == "webhooks"
    assert info.value.setting == setting
    assert str(info.value).startswith("pool 'webhooks': ")


def test_a_pool_takes_a_breaker_from_a_mapping() -> None:
    pool = Pool("webhooks", breaker={"fail_max": 2, "reset_timeout": 5})
    assert pool.breaker == Breaker(fail_max=2, reset_timeout=5)


def _bulkhead(*pools: Pool) -> Bulkhead:
    app = Celery("breakers", broker="memory://", set_as_current=False)
    return Bulkhead(app, pools=list(pools))


def test_pools_sharing_a_breaker_name_must_declare_the_same_settings() -> None:
    with pytest.raises(ConfigurationError) as info:
        _bulkhead(
            Pool("a", breaker=Breaker(name="pay", fail_max=5)),
            Pool("b", breaker=Breaker(name="pay", fail_max=6)),
        )
    assert info.value.pool == "b"
    assert info.value.setting == "breaker"
    assert "pay" in str(info.value)


def test_pools_sharing_a_breaker_name_share_one_circuit() -> None:
    bulkhead = _bulkhead(
        Pool("a", breaker=Breaker(fail_max=5)),  # named after its pool: "a"
        Pool("b", breaker=Breaker(name="a", fail_max=5)),
        Pool("c", breaker=Breaker(fail_max=5)),
        Pool("d"),
    )
    assert sorted(bulkhead.circuits) == ["a", "c"]
    pools = {p.name: p for p in bulkhead.assignment.pools.values()}
    assert bulkhead.circuit_of(pools["a"]) is bulkhead.circuit_of(pools["b"])
    assert bulkhead.circuit_of(pools["c"]) is not bulkhead.circuit_of(pools["a"])
    assert bulkhead.circuit_of(pools["d"]) is None


def test_breakers_from_settings_mappings() -> None:
    app = Celery("breakers", broker="memory://", set_as_current=False)
    bulkhead = Bulkhead(app, pools={"hooks": {"breaker": {"fail_max": 2, "reset_timeout": 5}}})
    assert bulkhead.circuits["hooks"].breaker == Breaker(fail_max=2, reset_timeout=5)
    with pytest.raises(ConfigurationError) as info:
        Bulkhead(
            Celery("bad", broker="memory://", set_as_current=False),
            pools={"hooks": {"breaker": {"half_open_max_calls": 0}}},
        )
    assert info.value.pool == "hooks"
    assert info.value.setting == "breaker.half_open_max_calls"


# -- what a failure is ----------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [Retry(), Ignore(), Reject("no", requeue=False), SoftTimeLimitExceeded(), None],
    ids=["Retry", "Ignore", "Reject", "SoftTimeLimitExceeded", "None"],
)
def test_celery_control_flow_is_not_a_failure(exc: BaseException | None) -> None:
    assert Breaker().is_failure(exc) is False
    wrapped = ExceptionWithTraceback(exc, "Traceback ...")
    assert Breaker().is_failure(wrapped) is False


@pytest.mark.parametrize(
    "exc",
    [Retry(), Ignore(), Reject("no"), SoftTimeLimitExceeded()],
    ids=["Retry", "Ignore", "Reject", "SoftTimeLimitExceeded"],
)
def test_control_flow_listed_in_include_is_a_failure(exc: BaseException) -> None:
    breaker = Breaker(include=(type(exc),))
    assert breaker.is_failure(exc) is True
    assert breaker.is_failure(ExceptionWithTraceback(exc, "tb")) is True
    others = [Retry(), Ignore(), Reject("no"), SoftTimeLimitExceeded()]
    assert [breaker.is_failure(o) for o in others] == [type(o) is type(exc) for o in others]


def test_a_hard_time_limit_and_any_other_exception_are_failures() -> None:
    breaker = Breaker()
    assert breaker.is_failure(TimeLimitExceeded(30)) is True
    assert breaker.is_failure(Downstream()) is True
    assert breaker.is_failure(ConnectionError()) is True
    assert breaker.is_failure(KeyboardInterrupt()) is True


def test_excluded_exceptions_and_their_subclasses_are_not_failures() -> None:
    class NotFound(ClientError):
        pass

    breaker = Breaker(exclude=(ClientError,))
    assert breaker.is_failure(ClientError()) is False
    assert breaker.is_failure(NotFound()) is False
    assert breaker.is_failure(ExceptionWithTraceback(NotFound(), "tb")) is False
    assert breaker.is_failure(Downstream()) is True
    # exclude wins over include.
    assert Breaker(include=(Retry,), exclude=(Retry,)).is_failure(Retry()) is False


def test_prefork_wrapped_exceptions_are_unwrapped() -> None:
    breaker = Breaker(exclude=(ClientError,))
    assert breaker.is_failure(ExceptionWithTraceback(Downstream(), "tb")) is True
    assert breaker.is_failure(ExceptionWithTraceback(TimeLimitExceeded(1), "tb")) is True
    assert breaker.is_failure(ExceptionWithTraceback(ClientError(), "tb")) is False


# -- the pure machine (milliseconds) ----------------------------------------------------

RESET, WINDOW, LEASE = 1_000.0, 60_000.0, 5_000.0


def opened(at: float = 10_000.0, fail_max: int = 3) -> machine.Record:
    rec = machine.Record()
    for i in range(fail_max):
        machine.failure(rec, at - (fail_max - 1 - i), fail_max, WINDOW, None)
    assert rec.state == OPEN and rec.opened_at == at
    return rec


def test_it_opens_on_the_fail_max_th_failure_within_the_window() -> None:
    rec = machine.Record()
    assert machine.failure(rec, 10_000, 3, WINDOW, None) is None
    assert machine.failure(rec, 20_000, 3, WINDOW, None) is None
    assert machine.peek(rec, 20_001, RESET) == (CLOSED, 0.0)
    assert machine.acquire(rec, 20_001, RESET, 1, LEASE, "t") == ("closed", 0.0, None)
    assert machine.failure(rec, 30_000, 3, WINDOW, None) == OPEN
    assert (rec.state, rec.opened_at, rec.failures) == (OPEN, 30_000, 0)
    assert machine.peek(rec, 30_400, RESET) == (OPEN, 600)
    assert machine.acquire(rec, 30_999, RESET, 1, LEASE, "t") == ("open", 1, None)


def test_the_window_ending_starts_the_count_again() -> None:
    window = 1_000
    rec = machine.Record()
    machine.failure(rec, 10_000, 3, window, None)
    machine.failure(rec, 10_900, 3, window, None)
    # 1,001 ms after the first failure: a new window, counting from one.
    assert machine.failure(rec, 11_001, 3, window, None) is None
    assert (rec.failures, rec.window_start) == (1, 11_001)
    assert machine.failure(rec, 11_500, 3, window, None) is None
    assert machine.failure(rec, 12_001, 3, window, None) == OPEN  # within 11,001 + 1,000


def test_a_success_does_not_reset_the_count() -> None:
    rec = machine.Record()
    machine.failure(rec, 1_000, 3, WINDOW, None)
    machine.failure(rec, 1_100, 3, WINDOW, None)
    assert machine.success(rec, 1_200, None) is None
    assert machine.failure(rec, 1_300, 3, WINDOW, None) == OPEN


def test_fail_max_one_opens_on_the_first_failure() -> None:
    rec = machine.Record()
    assert machine.failure(rec, 5, 1, WINDOW, None) == OPEN


def test_failures_while_open_change_nothing() -> None:
    rec = opened(10_000)
    before = copy.deepcopy(rec)
    for at in (10_001, 10_500, 10_999, 11_500):
        assert machine.failure(rec, at, 3, WINDOW, None) is None
        assert machine.success(rec, at, None) is None
    assert rec == before  # still opened at 10,000: stale reports do not push the trial back


def test_half_open_after_reset_timeout_and_the_first_caller_holds_the_trial() -> None:
    rec = opened(10_000)
    assert machine.acquire(rec, 10_999, RESET, 1, LEASE, "a") == ("open", 1, None)
    assert machine.peek(rec, 11_000, RESET) == (HALF_OPEN, 0.0)
    assert rec.state == OPEN  # peeking changes nothing
    assert machine.acquire(rec, 11_000, RESET, 1, LEASE, "a") == ("trial", 0.0, HALF_OPEN)
    assert rec.state == HALF_OPEN
    assert machine.peek(rec, 11_001, RESET) == (HALF_OPEN, 0.0)


def test_trials_are_limited_to_max_trials_and_busy_says_when_to_look_again() -> None:
    rec = opened(10_000)
    assert machine.acquire(rec, 11_000, RESET, 2, LEASE, "a") == ("trial", 0.0, HALF_OPEN)
    assert machine.acquire(rec, 11_100, RESET, 2, LEASE, "b") == ("trial", 0.0, None)
    # Leases end at 16,000 and 16,100: look again after one reset (1,000) at most.
    assert machine.acquire(rec, 11_200, RESET, 2, LEASE, "c") == (HALF_OPEN, RESET, None)
    # With short leases, when the first one ends.
    rec = opened(10_000)
    assert machine.acquire(rec, 11_000, RESET, 2, 300, "a")[0] == "trial"
    assert machine.acquire(rec, 11_100, RESET, 2, 300, "b")[0] == "trial"
    assert machine.acquire(rec, 11_200, RESET, 2, 300, "c") == (HALF_OPEN, 100, None)
    # An ended lease frees its slot.
    assert machine.acquire(rec, 11_300, RESET, 2, 300, "c") == ("trial", 0.0, None)
    assert machine.acquire(rec, 11_301, RESET, 2, 300, "d") == (HALF_OPEN, 99, None)


def test_a_trial_that_succeeds_closes_it() -> None:
    rec = opened(10_000)
    machine.acquire(rec, 11_000, RESET, 2, LEASE, "a")
    machine.acquire(rec, 11_000, RESET, 2, LEASE, "b")
    assert machine.success(rec, 11_500, "b") == CLOSED
    assert (rec.state, rec.failures, rec.trials) == (CLOSED, 0, {})
    assert machine.acquire(rec, 11_501, RESET, 2, LEASE, "c") == ("closed", 0.0, None)
    # The other trial's report comes too late to change anything.
    assert machine.success(rec, 11_600, "a") is None
    assert machine.failure(rec, 11_600, 3, WINDOW, "a") is None
    assert rec.state == CLOSED and rec.failures == 1  # counted as an ordinary failure


def test_a_trial_that_fails_opens_it_again_for_a_full_reset() -> None:
    rec = opened(10_000)
    machine.acquire(rec, 11_000, RESET, 1, LEASE, "a")
    assert machine.failure(rec, 11_400, 3, WINDOW, "a") == OPEN
    assert (rec.state, rec.opened_at, rec.trials) == (OPEN, 11_400, {})
    assert machine.peek(rec, 11_500, RESET) == (OPEN, 900)
    assert machine.acquire(rec, 12_399, RESET, 1, LEASE, "b") == ("open", 1, None)
    assert machine.acquire(rec, 12_400, RESET, 1, LEASE, "b") == ("trial", 0.0, HALF_OPEN)


def test_reports_from_non_trials_during_half_open_change_nothing() -> None:
    rec = opened(10_000)
    machine.acquire(rec, 11_000, RESET, 1, LEASE, "a")
    before = copy.deepcopy(rec)
    for token in (None, "stranger", ""):
        assert machine.failure(rec, 11_100, 1, WINDOW, token) is None
        assert machine.success(rec, 11_100, token) is None
    assert rec == before


def test_a_trial_whose_lease_ended_changes_nothing() -> None:
    rec = opened(10_000)
    machine.acquire(rec, 11_000, RESET, 1, 300, "a")
    assert machine.success(rec, 11_300, "a") is None  # its lease ended at 11,300
    assert machine.failure(rec, 11_300, 3, WINDOW, "a") is None
    assert rec.state == HALF_OPEN
    assert machine.acquire(rec, 11_301, RESET, 1, 300, "b") == ("trial", 0.0, None)
    assert machine.success(rec, 11_400, "b") == CLOSED


def test_a_trial_given_back_frees_its_slot_and_nothing_else() -> None:
    rec = opened(10_000)
    machine.acquire(rec, 11_000, RESET, 2, LEASE, "a")
    machine.acquire(rec, 11_000, RESET, 2, LEASE, "b")
    machine.release(rec, "a")
    assert rec.state == HALF_OPEN and [t for t, _ in rec.trials.values()] == ["b"]
    assert machine.success(rec, 11_100, "a") is None
    assert machine.acquire(rec, 11_100, RESET, 2, LEASE, "c") == ("trial", 0.0, None)


# -- the rate window (milliseconds) ----------------------------------------------------

#: 10 buckets of 1 s: a 10 s window.
RATES = machine.Rates(bucket=1_000, minimum_calls=10, failure_rate=50.0, slow_rate=None)


def calls(n: int, failures: int = 0, slow: int = 0) -> machine.Calls:
    return machine.Calls(n, failures, slow)


def test_a_failure_rate_exactly_at_the_threshold_opens_it() -> None:
    rec = machine.Record()
    assert machine.count(rec, 100_000, calls(6, 2), RATES) is None
    assert machine.count(rec, 100_500, calls(3, 2), RATES) is None  # 4 of 9: under minimum
    assert machine.totals(rec, 100_500, RATES) == calls(9, 4)
    assert machine.count(rec, 100_600, calls(1, 1), RATES) == OPEN  # 5 of 10 = 50 %
    assert (rec.state, rec.opened_at, rec.buckets) == (OPEN, 100_600, {})


def test_a_failure_rate_just_under_the_threshold_does_not() -> None:
    rec = machine.Record()
    assert machine.count(rec, 100_000, calls(11, 5), RATES) is None  # 45.5 %
    assert machine.count(rec, 100_001, calls(100, 50), RATES) is None  # 55 of 111 = 49.5 %
    assert rec.state == CLOSED
    assert machine.count(rec, 100_002, calls(1, 1), RATES) == OPEN  # 56 of 112 = 50 %


def test_thresholds_that_are_not_whole_numbers_compare_exactly() -> None:
    third = machine.Rates(bucket=1_000, minimum_calls=3, failure_rate=100 / 3, slow_rate=None)
    assert machine.crossed(calls(3, 1), third)
    assert not machine.crossed(calls(300_001, 100_000), third)
    assert machine.crossed(calls(1, 1), replace_rates(minimum_calls=1, failure_rate=100.0))
    assert not machine.crossed(calls(1, 0), replace_rates(minimum_calls=1, failure_rate=0.01))


def replace_rates(**changes: Any) -> machine.Rates:
    return dataclasses.replace(RATES, **changes)


def test_below_minimum_calls_it_never_opens() -> None:
    rec = machine.Record()
    for at in range(100_000, 109_000, 1_000):  # 9 calls, every one failed and slow
        assert machine.count(rec, at, calls(1, 1, 1), replace_rates(slow_rate=1.0)) is None
    assert rec.state == CLOSED and machine.totals(rec, 108_000, RATES) == calls(9, 9, 9)
    # The 10th call reaches minimum_calls.
    assert machine.count(rec, 109_000, calls(1), RATES) == OPEN


def test_buckets_slide_out_of_the_window() -> None:
    rec = machine.Record()
    machine.count(rec, 100_000, calls(5, 4), RATES)  # bucket 100
    machine.count(rec, 105_500, calls(4, 0), RATES)  # bucket 105
    assert machine.totals(rec, 109_999, RATES) == calls(9, 4)  # buckets 100..109
    # At 110,000 bucket 100 has left the window, its failures with it.
    assert machine.totals(rec, 110_000, RATES) == calls(4, 0)
    assert sorted(rec.buckets) == [105]
    assert machine.count(rec, 110_000, calls(6, 4), RATES) is None  # 4 of 10: 40 %
    # Had they stayed, 8 of 15 would have opened it.
    rec2 = machine.Record()
    machine.count(rec2, 100_000, calls(5, 4), RATES)
    machine.count(rec2, 105_500, calls(4, 0), RATES)
    assert machine.count(rec2, 109_999, calls(6, 4), RATES) == OPEN


def test_slow_calls_open_it_by_their_own_rate() -> None:
    slow = machine.Rates(bucket=1_000, minimum_calls=4, failure_rate=None, slow_rate=75.0)
    rec = machine.Record()
    assert machine.count(rec, 100_000, calls(4, 4, 2), slow) is None  # failures: no rule
    assert machine.count(rec, 100_100, calls(4, 0, 3), slow) is None  # 5 of 8 slow
    assert machine.count(rec, 100_200, calls(4, 0, 4), slow) == OPEN  # 9 of 12 = 75 %


def test_a_slow_call_that_failed_counts_in_both_rates() -> None:
    both = machine.Rates(bucket=1_000, minimum_calls=2, failure_rate=60.0, slow_rate=60.0)
    rec = machine.Record()
    assert machine.count(rec, 100_000, calls(2, 1, 1), both) is None  # 50 % and 50 %
    assert machine.count(rec, 100_000, calls(1, 1, 1), both) == OPEN  # 66 % of each
    slow_only = dataclasses.replace(both, failure_rate=None)
    rec = machine.Record()
    machine.count(rec, 100_000, calls(2, 1, 1), slow_only)
    assert machine.count(rec, 100_000, calls(1, 1, 1), slow_only) == OPEN


def test_counts_reported_while_not_closed_change_nothing() -> None:
    rec = opened(10_000)
    before = copy.deepcopy(rec)
    assert machine.count(rec, 10_500, calls(100, 100, 100), RATES) is None
    assert rec == before
    machine.acquire(rec, 11_000, RESET, 1, LEASE, "a")
    assert machine.count(rec, 11_100, calls(100, 100), RATES) is None
    assert rec.state == HALF_OPEN and rec.buckets == {}


def test_every_transition_starts_an_empty_window() -> None:
    rec = machine.Record()
    machine.count(rec, 10_000, calls(9, 4), RATES)
    machine.failure(rec, 10_001, 1, WINDOW, None)  # fail_max=1 opens it
    assert rec.state == OPEN and rec.buckets == {}
    machine.acquire(rec, 11_001, RESET, 1, LEASE, "a")
    assert machine.success(rec, 11_002, "a") == CLOSED
    # 4 failures of 9 before the outage no longer count: 1 of 1 is under minimum_calls.
    assert machine.count(rec, 11_003, calls(1, 1), RATES) is None
    assert machine.totals(rec, 11_003, RATES) == calls(1, 1)


def test_a_failure_carries_the_callers_counts_and_either_rule_opens_it() -> None:
    rec = machine.Record()
    # fail_max 100: the failure is counted, and its counts (9 calls, 5 failed) open it by rate.
    assert machine.failure(rec, 100_000, 100, WINDOW, None, calls(9, 4), RATES) is None
    assert rec.failures == 1 and machine.totals(rec, 100_000, RATES) == calls(9, 4)
    assert machine.failure(rec, 100_001, 100, WINDOW, None, calls(1, 1), RATES) == OPEN
    # fail_max reached first: it opens whatever the rate (here 2 of 20).
    rec = machine.Record()
    machine.failure(rec, 100_000, 2, WINDOW, None, calls(10, 1), RATES)
    assert machine.failure(rec, 100_001, 2, WINDOW, None, calls(10, 1), RATES) == OPEN
    assert rec.buckets == {}


def test_without_rates_a_failure_counts_nothing_in_the_window() -> None:
    rec = machine.Record()
    assert machine.failure(rec, 100_000, 3, WINDOW, None) is None
    assert rec.buckets == {}


# -- the circuit: a cached view, on a fake clock ----------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingStore:
    """A memory store that counts its calls and can be told to fail."""

    def __init__(self, clock: Clock) -> None:
        self.inner = MemoryBreakerStore(clock=clock)
        self.calls: Counter[str] = Counter()
        self.broken = False

    def __getattr__(self, op: str) -> Any:
        method = getattr(self.inner, op)

        def call(*args: Any) -> Any:
            self.calls[op] += 1
            if self.broken:
                raise ConnectionError("state store down")
            return method(*args)

        return call


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(circuit_module, "time", SimpleNamespace(monotonic=fake))
    return fake


def circuit(clock: Clock, **settings: Any) -> tuple[Circuit, CountingStore]:
    settings = {"fail_max": 2, "reset_timeout": 10, "cache_seconds": 1, **settings}
    store = CountingStore(clock)
    return Circuit("pay", Breaker(**settings), store, lease=60.0), store


def fail(c: Circuit, times: int = 1) -> None:
    for _ in range(times):
        verdict = c.before()
        c.after(verdict.token, Downstream())


def test_a_closed_circuit_costs_no_store_call_per_task(clock: Clock) -> None:
    c, store = circuit(clock)
    for _ in range(1_000):
        verdict = c.before()
        assert verdict.run and verdict.token is None
        c.after(verdict.token, None)  # a success while closed: the free path
        c.after(None, Retry())
        c.after(None, Ignore())
    assert store.calls == {"peek": 1}  # the first look; then the cache is fresh


def test_a_closed_circuit_peeks_at_most_once_per_cache_seconds(clock: Clock) -> None:
    c, store = circuit(clock, cache_seconds=0.25)
    for _ in range(1_000):  # 10 s of tasks, one every 10 ms
        assert c.before().run
        clock.advance(0.01)
    assert store.calls["peek"] <= 10 / 0.25 + 1
    assert set(store.calls) == {"peek"}


def test_an_open_circuit_peeks_at_most_once_per_cache_seconds(clock: Clock) -> None:
    c, store = circuit(clock, reset_timeout=30, cache_seconds=0.5)
    fail(c, 2)
    store.calls.clear()
    for _ in range(500):  # 5 s of refused tasks
        verdict = c.before()
        assert not verdict.run and 0 < verdict.retry_after <= 30
        clock.advance(0.01)
    assert store.calls["peek"] <= 5 / 0.5 + 1
    assert set(store.calls) == {"peek"}


def test_only_failures_and_trials_reach_the_store(clock: Clock) -> None:
    c, store = circuit(clock, fail_max=100, exclude=(ClientError,))
    c.before()
    store.calls.clear()
    c.after(None, ClientError())
    c.after(None, SoftTimeLimitExceeded())
    assert store.calls == {}
    c.after(None, Downstream())
    c.after(None, TimeLimitExceeded(5))
    assert store.calls == {"failure": 2}


RATE = {"fail_max": 100_000, "failure_rate_threshold": 50, "minimum_calls": 10}


def test_a_rate_window_costs_one_store_call_per_cache_seconds_not_per_task(
    clock: Clock,
) -> None:
    c, store = circuit(clock, cache_seconds=0.25, slow_call_duration=1, **RATE)
    for _ in range(1_000):  # 10 s of successes, one every 10 ms
        verdict = c.before()
        assert verdict.run
        c.after(verdict.token, None, 0.005)
        c.after(None, Retry(), 0.005)  # not a failure: a call that did not fail
        clock.advance(0.01)
    assert sum(store.calls.values()) <= 10 / 0.25 + 1
    assert set(store.calls) == {"peek", "count"}
    # Every call was reported but the last interval's (which the next refresh carries).
    window = store.inner._records["pay"]
    reported = machine.totals(window, clock() * 1000, c.breaker.rates)  # type: ignore[arg-type]
    assert 2_000 - 2 * 25 <= reported.calls <= 2_000 and reported.failures == 0


def test_without_a_rate_window_durations_and_successes_count_nothing(clock: Clock) -> None:
    c, store = circuit(clock)
    for _ in range(100):
        c.after(c.before().token, None, 5.0)
        clock.advance(0.1)
    assert set(store.calls) == {"peek"}
    assert c._take() is None


def test_counted_calls_reach_the_store_with_the_next_refresh(clock: Clock) -> None:
    c, store = circuit(clock, **RATE)
    assert c.before().run  # the first look
    for _ in range(9):
        c.after(None, None, 0.1)
    assert store.calls == {"peek": 1}  # counted in memory
    clock.advance(1)
    assert c.before().run  # the refresh reports them: one call
    assert store.calls == {"peek": 1, "count": 1}
    assert store.inner._records["pay"].buckets  # in the window now


def test_a_quiet_process_reports_when_its_last_task_ends_after_the_refresh_is_due(
    clock: Clock,
) -> None:
    c, store = circuit(clock, **RATE)
    assert c.before().run
    clock.advance(1.5)  # a long task: the refresh is due when it ends
    c.after(None, None, 1.5)
    assert store.calls == {"peek": 1, "count": 1}


def test_a_failure_carries_the_counted_calls_and_a_rate_opens_it(clock: Clock) -> None:
    listener = Listener()
    c, store = circuit(clock, listeners=(listener,), **RATE)
    c.before()
    for _ in range(5):
        c.after(None, None, 0.1)
    for _ in range(4):
        c.after(None, Downstream(), 0.1)  # 4 failures, each with the counts so far
    assert store.calls == {"peek": 1, "failure": 4}
    assert c.state()[0] == CLOSED  # 4 of 9: under minimum_calls
    c.after(None, Downstream(), 0.1)  # 5 of 10: 50 %
    assert c.state()[0] == OPEN and listener.changes == [(CLOSED, OPEN)]
    assert not c.before().run


def test_slow_calls_open_it_through_the_circuit(clock: Clock) -> None:
    c, _ = circuit(
        clock, fail_max=100_000, minimum_calls=4, slow_call_duration=2, slow_call_rate_threshold=75
    )
    c.before()
    for duration in (2.5, 3.0, 1.0, 2.0):  # 2 s is not over 2 s: 2 slow of 4
        c.after(None, None, duration)
    clock.advance(1)
    assert c.before().run
    c.after(None, None, 10.0)
    c.after(None, Downstream(), 10.0)  # slow and failed: reported at once, 4 slow of 6
    c.after(None, None, 2.01)
    clock.advance(1)  # 5 slow of 7: 71 %
    assert c.before().run
    c.after(None, None, 60.0)  # 6 of 8 = 75 %
    clock.advance(1)
    assert not c.before().run and c.state()[0] == OPEN


def test_a_rate_report_that_fails_falls_back_and_drops_its_counts(clock: Clock) -> None:
    c, store = circuit(clock, **RATE)
    c.before()
    for _ in range(20):
        c.after(None, None)
    store.broken = True
    clock.advance(1)
    assert c.before().run  # on_state_error="closed"
    store.broken = False
    assert c._take() is None
    assert store.inner._records["pay"].buckets == {}  # nothing reached the store


def test_a_full_cycle_tells_the_listeners_old_and_new_state_names(clock: Clock) -> None:
    listener = Listener()
    c, _ = circuit(clock, listeners=(BrokenListener(), listener))
    fail(c, 2)
    assert listener.changes == [(CLOSED, OPEN)]
    assert all(cb.name == "pay" for cb in listener.breakers)
    refused = c.before()
    assert not refused.run and refused.retry_after == pytest.approx(10)
    assert c.state() == (OPEN, pytest.approx(10))

    clock.advance(10)
    trial = c.before()
    assert trial.run and trial.token is not None
    assert listener.changes[-1] == (OPEN, HALF_OPEN)
    busy = c.before()  # the one trial is taken
    assert not busy.run and 0 < busy.retry_after <= 10
    assert c.state()[0] == HALF_OPEN  # not "open": the gauge shows 1

    c.after(trial.token, Downstream())  # the trial failed: open for another reset
    assert listener.changes[-1] == (HALF_OPEN, OPEN)
    assert c.state() == (OPEN, pytest.approx(10))
    clock.advance(10)
    trial = c.before()
    c.after(trial.token, None)
    assert listener.changes == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]
    assert c.transitions == {OPEN: 2, HALF_OPEN: 2, CLOSED: 1}
    assert c.before().run and c.state() == (CLOSED, 0.0)


def test_a_trial_ending_in_control_flow_is_not_a_failure(clock: Clock) -> None:
    c, _ = circuit(clock)
    fail(c, 2)
    clock.advance(10)
    trial = c.before()
    c.after(trial.token, Retry())
    assert c.state()[0] == CLOSED


def test_a_trial_given_back_lets_the_next_task_be_the_trial(clock: Clock) -> None:
    c, store = circuit(clock)
    fail(c, 2)
    clock.advance(10)
    trial = c.before()
    assert not c.before().run
    c.release(trial.token)
    again = c.before()
    assert again.run and again.token not in (None, trial.token)
    c.release(None)  # nothing held: nothing to do
    store.broken = True
    c.release(again.token)  # best effort: the lease ends on its own
    store.broken = False
    assert c.transitions == {OPEN: 1, HALF_OPEN: 1}


def test_another_process_sees_the_transition_within_cache_seconds(clock: Clock) -> None:
    store = MemoryBreakerStore(clock=clock)
    breaker = Breaker(fail_max=2, reset_timeout=10, cache_seconds=0.5)
    here, there = Circuit("pay", breaker, store, 60), Circuit("pay", breaker, store, 60)
    assert there.before().run  # "there" caches "closed"
    fail(here, 2)
    assert there.before().run  # stale, for at most cache_seconds
    clock.advance(0.5)
    assert not there.before().run


def test_a_failing_listener_never_breaks_the_circuit(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    c, _ = circuit(clock, listeners=(BrokenListener(),))
    with caplog.at_level(logging.ERROR, logger="celery_bulkhead.breaker"):
        fail(c, 2)
    assert c.state()[0] == OPEN
    assert "a listener failed" in caplog.text


@pytest.mark.parametrize("op", ["peek", "failure", "acquire"])
def test_state_errors_fall_back_to_closed_by_default(clock: Clock, op: str) -> None:
    c, store = circuit(clock)
    if op == "acquire":  # reach a trial first
        fail(c, 2)
        clock.advance(10)
        store.inner.peek(c)
    store.broken = True
    if op == "failure":
        c.after(None, Downstream())
    clock.advance(1)
    verdict = c.before()
    assert verdict.run and verdict.token is None
    assert c.state()[0] == CLOSED


def test_state_errors_fall_back_to_open_when_asked(clock: Clock) -> None:
    c, store = circuit(clock, on_state_error="open", cache_seconds=0.5)
    store.broken = True
    verdict = c.before()
    assert not verdict.run and verdict.retry_after == pytest.approx(0.5)
    assert c.state() == (OPEN, pytest.approx(0.5))
    clock.advance(0.5)
    store.broken = False  # back: the next look after cache_seconds sees it
    assert c.before().run


def test_state_errors_are_logged_at_most_every_ten_seconds(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    c, store = circuit(clock, cache_seconds=0.05)
    store.broken = True
    with caplog.at_level(logging.WARNING, logger="celery_bulkhead.breaker"):
        for _ in range(200):  # 19.9 s
            c.before()
            clock.advance(0.1)
    warnings = [r.getMessage() for r in caplog.records if "state unavailable" in r.getMessage()]
    assert len(warnings) == 2
    assert "1 time(s)" in warnings[0] and "100 time(s)" in warnings[1]
    assert "ConnectionError" in warnings[0] and "acting as closed" in warnings[0]
    assert store.calls["peek"] == 200  # one look per cache_seconds, each failing


# -- at submit: fail_fast_at_submit on the cached state -----------------------------------


def _submit_app(clock: Clock, **breaker: Any) -> tuple[Any, Circuit, CountingStore, str]:
    pool = f"hooks{next(_names)}"
    app = Celery("submit", broker="memory://", set_as_current=False)
    settings = {"fail_max": 2, "reset_timeout": 10, "fail_fast_at_submit": True, **breaker}
    bulkhead = Bulkhead(app, pools=[Pool(pool, breaker=Breaker(**settings))])

    @app.task(bulkhead=pool, name=f"{pool}.call", shared=False)
    def call(tag: str) -> None:
        """Never runs: nothing consumes."""

    c = bulkhead.circuits[pool]
    store = CountingStore(clock)
    c.store = store
    return call, c, store, pool


_names = iter(range(1_000_000))


def _rejections(pool: str) -> float:
    from prometheus_client import REGISTRY

    labels = {"pool": pool, "decision": "rejected", "reason": "circuit_open"}
    return REGISTRY.get_sample_value("celery_bulkhead_admissions_total", labels) or 0.0


def test_fail_fast_at_submit_refuses_while_open_without_a_store_call_per_publish(
    clock: Clock,
) -> None:
    call, c, store, pool = _submit_app(clock)
    for i in range(50):
        call.delay(f"t{i}")
    assert store.calls == {"peek": 1}
    fail(c, 2)  # this process opens it: its view is open at once
    store.calls.clear()
    for _ in range(20):
        with pytest.raises(CircuitOpen) as info:
            call.delay("refused")
        clock.advance(0.1)
    assert (info.value.pool, info.value.breaker) == (pool, pool)
    assert 0 < info.value.retry_after <= 10
    assert info.value.retry_after == pytest.approx(10 - 1.9)
    assert store.calls["peek"] <= 2 + 1  # 2 s at cache_seconds=1
    assert _rejections(pool) == 20
    clock.advance(8.1)  # the reset has passed: half-open admits (the worker picks the trial)
    call.delay("admitted")
    assert _rejections(pool) == 20


def test_fail_fast_at_submit_sees_another_process_open_it_within_cache_seconds(
    clock: Clock,
) -> None:
    call, c, store, _ = _submit_app(clock, cache_seconds=0.5)
    call.delay("first")  # caches "closed"
    worker = Circuit(c.name, c.breaker, store.inner, 60)
    fail(worker, 2)
    call.delay("stale")  # within cache_seconds: still admitted
    clock.advance(0.5)
    with pytest.raises(CircuitOpen):
        call.delay("refused")


def test_without_fail_fast_at_submit_an_open_breaker_admits(clock: Clock) -> None:
    call, c, store, _ = _submit_app(clock, fail_fast_at_submit=False)
    fail(c, 2)
    store.calls.clear()
    for i in range(5):
        call.delay(f"t{i}")
    assert store.calls == {}


# -- at the worker: WorkerGate with a fake request ---------------------------------------


@dataclass
class FakeMessage:
    body: bytes = b'[["x"], {}, {}]'
    headers: dict[str, Any] = field(default_factory=lambda: {"id": "task-1", "task": "t"})
    content_type: str = "application/json"
    content_encoding: str = "utf-8"
    properties: dict[str, Any] = field(default_factory=lambda: {"correlation_id": "task-1"})
    delivery_info: dict[str, Any] = field(default_factory=dict)


class FakeBackend:
    def __init__(self) -> None:
        self.failures: list[tuple[str, BaseException]] = []

    def mark_as_failure(self, task_id: str, exc: BaseException, **kwargs: Any) -> None:
        self.failures.append((task_id, exc))


class FakeRequest:
    def __init__(self, deferrals: int | None = None) -> None:
        self.id = "task-1"
        self._message = FakeMessage()
        if deferrals is not None:
            self._message.headers[DEFERRALS] = deferrals
        self.request_dict = dict(self._message.headers)
        self.args: list[Any] = ["x"]
        self.kwargs: dict[str, Any] = {}
        self.name = "t"
        self.acked = 0
        self.task = SimpleNamespace(backend=FakeBackend())
        self._context = None
        self.store_errors = True
        self.bulkhead_trial: str | None = None
        self.bulkhead_exc: BaseException | None = None
        self.bulkhead_tenant = None

    def acknowledge(self) -> None:
        self.acked += 1


class FakeProducer:
    def __init__(self, broken: bool) -> None:
        self.broken = broken
        self.published: list[tuple[Any, dict[str, Any]]] = []

    def publish(self, body: Any, **kwargs: Any) -> None:
        if self.broken:
            raise ConnectionError("broker down")
        self.published.append((body, kwargs))


class FakeMetrics:
    def __init__(self) -> None:
        self.refused: Counter[str] = Counter()

    def breaker_refused(self, breaker: str, action: str) -> None:
        self.refused[action] += 1

    def throttled(self) -> None:
        raise AssertionError("not a tenant deferral")


@dataclass
class GateUnderTest:
    gate: WorkerGate
    circuit: Circuit
    producer: FakeProducer
    metrics: FakeMetrics
    pool: Pool


def _gate(
    clock: Clock, broken_broker: bool = False, visibility_timeout: float = 60, **breaker: Any
) -> GateUnderTest:
    # A Redis broker URL (nothing connects): deferral countdowns are capped by its
    # visibility timeout.
    app = Celery("gate", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.broker_transport_options = {"visibility_timeout": visibility_timeout}
    settings = {"fail_max": 2, "reset_timeout": 10, **breaker}
    pool = Pool("hooks", max_queue=100, breaker=Breaker(**settings))
    store = MemoryBreakerStore(clock=clock)
    c = Circuit("hooks", pool.breaker, store, lease=60)  # type: ignore[arg-type]
    producer = FakeProducer(broken_broker)

    @contextlib.contextmanager
    def producer_or_acquire() -> Iterator[FakeProducer]:
        yield producer

    app.producer_or_acquire = producer_or_acquire  # type: ignore[method-assign]
    metrics = FakeMetrics()
    gate = WorkerGate(app, pool, None, metrics, c)
    return GateUnderTest(gate, c, producer, metrics, pool)


def _eta(kwargs: dict[str, Any]) -> float:
    return datetime.fromisoformat(kwargs["headers"]["eta"]).timestamp() - time.time()


def test_the_gate_runs_tasks_while_closed_and_reports_only_failures(clock: Clock) -> None:
    t = _gate(clock)
    request = FakeRequest()
    assert t.gate.admit(request) is True
    assert request.bulkhead_trial is None and t.producer.published == []
    request.bulkhead_exc = Downstream()
    t.gate.finished(request, "failed", 0.1, True)
    t.gate.finished(request, "failed", 0.1, False)  # never started: not the downstream's
    assert t.circuit.store.peek(t.circuit)[0] == CLOSED
    t.gate.finished(request, "failed", 0.1, True)
    assert t.circuit.store.peek(t.circuit)[0] == OPEN


def test_while_open_a_task_is_deferred_unchanged_to_the_continuation_queue(
    clock: Clock,
) -> None:
    t = _gate(clock)
    fail(t.circuit, 2)
    clock.advance(4)
    request = FakeRequest(deferrals=2)
    assert t.gate.admit(request) is False
    t.gate.skipped(request)
    (body, sent), *others = t.producer.published
    assert others == []
    assert body is request._message.body  # the same message, not a retry
    assert sent["exchange"] == "bulkhead.hooks"
    assert sent["routing_key"] == "bulkhead.hooks.continue"
    assert sent["correlation_id"] == "task-1"
    assert sent["headers"]["id"] == "task-1"
    assert sent["headers"][DEFERRALS] == 3
    assert 6 - 0.1 <= _eta(sent) <= 6 + 1.05  # the next trial time, plus jitter
    assert request.acked == 1  # acknowledged once published
    assert t.metrics.refused == {"deferred": 1}


def test_a_long_open_defers_by_half_the_visibility_timeout_at_most(clock: Clock) -> None:
    t = _gate(clock, visibility_timeout=60, reset_timeout=3600)
    assert t.gate.horizon == 30
    fail(t.circuit, 2)
    assert t.gate.admit(FakeRequest()) is False
    (_, sent), *_ = t.producer.published
    assert 30 - 0.1 <= _eta(sent) <= 30 + 1.05


def test_a_task_whose_deferral_cannot_be_published_runs(clock: Clock) -> None:
    """Never lost: when the broker refuses the new publish, the task runs now."""
    t = _gate(clock, broken_broker=True)
    fail(t.circuit, 2)
    request = FakeRequest()
    assert t.gate.admit(request) is True
    assert request.acked == 0 and t.metrics.refused == {}


def test_on_open_fail_stores_circuit_open_and_acknowledges(clock: Clock) -> None:
    t = _gate(clock, on_open="fail")
    fail(t.circuit, 2)
    request = FakeRequest()
    assert t.gate.admit(request) is False
    ((task_id, error),) = request.task.backend.failures
    assert task_id == "task-1" and isinstance(error, CircuitOpen)
    assert error.retry_after == pytest.approx(10)
    assert request.acked == 1 and t.producer.published == []
    assert t.metrics.refused == {"failed": 1}


def test_the_gate_holds_a_trial_for_its_task_and_reports_how_it_ended(clock: Clock) -> None:
    t = _gate(clock)
    fail(t.circuit, 2)
    clock.advance(10)
    trial = FakeRequest()
    assert t.gate.admit(trial) is True and trial.bulkhead_trial is not None
    other = FakeRequest()
    assert t.gate.admit(other) is False  # the one trial is taken: deferred
    t.gate.finished(trial, "succeeded", 0.1, True)
    assert t.circuit.state()[0] == CLOSED
    assert t.gate.admit(FakeRequest()) is True


def test_the_gate_reports_each_call_with_its_duration_since_it_was_let_through(
    clock: Clock,
) -> None:
    t = _gate(
        clock,
        fail_max=100_000,
        minimum_calls=2,
        slow_call_duration=1.0,
        slow_call_rate_threshold=100,
        cache_seconds=1,
    )
    for _ in range(2):
        request = FakeRequest()
        assert t.gate.admit(request) is True
        assert isinstance(request.bulkhead_let_through, float)  # type: ignore[attr-defined]
        request.bulkhead_let_through -= 1.5  # type: ignore[attr-defined]  # let through 1.5 s ago
        t.gate.finished(request, "succeeded", 0.001, True)  # Celery's runtime: not the one used
    clock.advance(1)
    assert t.gate.admit(FakeRequest()) is False  # 2 slow of 2: opened at the refresh
    assert t.circuit.state()[0] == OPEN


def test_trial_leases_are_the_time_limit_plus_a_minute_or_the_reset() -> None:
    bulkhead = _bulkhead(
        Pool("limited", time_limit=30, breaker=Breaker()),
        Pool("slow", breaker=Breaker(reset_timeout=120)),
        Pool("plain", breaker=Breaker()),
    )
    leases = {name: c.lease for name, c in bulkhead.circuits.items()}
    assert leases == {"limited": 90.0, "slow": 120.0, "plain": 60.0}


def test_a_trial_granted_to_a_task_that_never_started_is_given_back(clock: Clock) -> None:
    t = _gate(clock)
    fail(t.circuit, 2)
    clock.advance(10)
    trial = FakeRequest()
    assert t.gate.admit(trial) is True and trial.bulkhead_trial is not None
    t.gate.release(trial)  # revoked before it started, or the pool refused it
    t.gate.finished(trial, "revoked", None, False)
    assert t.gate.admit(FakeRequest()) is True  # the next task is the trial
