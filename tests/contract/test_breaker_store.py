"""The breaker-store contract, on every store: in-process memory and Redis (one Lua call each).

Both stores answer the same five operations (``peek``, ``acquire``,
``failure``, ``success``, ``release``) the same way, on real time: a breaker opens on
its ``fail_max``-th failure within the window and not before, stays open
for ``reset_timeout``, then lets at most ``half_open_max_calls`` trials run
at once however many callers race for them; a trial's success closes it, its
failure opens it again, a trial given back frees its slot, and nobody
else's report changes anything.  With a rate window, both count the calls
a caller reports (``count``, or with a ``failure``) over the same sliding
buckets: a rate opens it exactly at its threshold and never below
``minimum_calls``, buckets slide out, and every transition starts the
window empty.  On
Redis every key carries the breaker's ``{hash tag}`` and a TTL that covers
the state it holds, and clocks of the callers do not matter.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from celery_bulkhead.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from celery_bulkhead.breaker.machine import Calls
from celery_bulkhead.breaker.memory import MemoryBreakerStore
from celery_bulkhead.breaker.redis import RedisBreakerStore
from tests.support import wait_for

REDIS_URL = "redis://127.0.0.1:6379/9"
RESET = 0.3
#: What real time may add to a wait between a call and the next (ms).
SLACK_MS = 50


@dataclass
class Subject:
    """A store under test; every circuit it makes has a breaker name of its own."""

    kind: str
    store: Any
    client: redis.Redis | None
    names: list[str]

    def circuit(self, lease: float = 60.0, **settings: Any) -> Any:
        name = f"contract-{uuid.uuid4().hex[:10]}"
        self.names.append(name)
        settings = {"fail_max": 3, "reset_timeout": RESET, "name": name, **settings}
        return SimpleNamespace(name=name, breaker=Breaker(**settings), lease=lease)

    def keys(self, circuit: Any) -> list[bytes]:
        assert self.client is not None
        return sorted(self.client.scan_iter(match=f"bulkhead:{{breaker:{circuit.name}}}*"))


def _redis_subject() -> Iterator[Subject]:
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()  # a missing Redis fails here, loudly
    subject = Subject("redis", RedisBreakerStore(REDIS_URL, timeout=2), client, [])
    yield subject
    for name in subject.names:  # key deletion, never a flush
        leftover = list(client.scan_iter(match=f"bulkhead:{{breaker:{name}}}*"))
        if leftover:
            client.delete(*leftover)
    client.close()


@pytest.fixture(params=["memory", "redis"])
def subject(request: pytest.FixtureRequest) -> Iterator[Subject]:
    if request.param == "memory":
        yield Subject("memory", MemoryBreakerStore(), None, [])
    else:
        yield from _redis_subject()


@pytest.fixture
def on_redis() -> Iterator[Subject]:
    """The Redis store alone, for what only it promises (keys, TTLs, server time)."""
    yield from _redis_subject()


def open_it(subject: Subject, circuit: Any) -> None:
    """Fail until it opens: at most fail_max failures."""
    for _ in range(circuit.breaker.fail_max):
        state, _, transition = subject.store.failure(circuit, None)
        if transition is not None:
            break
    assert (state, transition) == (OPEN, OPEN)


def half_open(subject: Subject, circuit: Any) -> None:
    """Open it and wait (on real time) for its reset to pass."""
    open_it(subject, circuit)
    wait_for(
        lambda: subject.store.peek(circuit)[0] == HALF_OPEN,
        circuit.breaker.reset_timeout + 2,
        "the reset time",
        interval=0.01,
    )


def test_closed_until_the_fail_max_th_failure(subject: Subject) -> None:
    c = subject.circuit(fail_max=3)
    store = subject.store
    assert store.peek(c) == (CLOSED, 0)
    assert store.acquire(c, "t") == (CLOSED, 0, None)
    assert store.failure(c, None) == (CLOSED, 0, None)
    assert store.success(c, None) == (CLOSED, 0, None)  # does not reset the count
    assert store.failure(c, None) == (CLOSED, 0, None)
    state, wait, transition = store.failure(c, None)
    assert (state, transition) == (OPEN, OPEN)
    assert wait == pytest.approx(RESET * 1000, abs=1)
    state, wait = store.peek(c)
    assert state == OPEN and RESET * 1000 - SLACK_MS <= wait <= RESET * 1000
    answer, wait, transition = store.acquire(c, "t")
    assert (answer, transition) == ("open", None) and 0 < wait <= RESET * 1000


def test_reports_while_open_change_nothing_and_tell_the_time_left(subject: Subject) -> None:
    c = subject.circuit(reset_timeout=5)
    open_it(subject, c)
    time.sleep(0.05)
    for report in (subject.store.failure, subject.store.success):
        for token in (None, "stranger"):
            state, wait, transition = report(c, token)
            assert (state, transition) == (OPEN, None)
            # The time left of the first opening: a late report does not push it back.
            assert 5000 - 50 - SLACK_MS <= wait <= 5000 - 50
    assert subject.store.peek(c)[0] == OPEN


def test_half_open_after_reset_timeout_with_one_trial(subject: Subject) -> None:
    c = subject.circuit()
    opened = time.monotonic()
    half_open(subject, c)
    assert time.monotonic() - opened >= RESET - 0.01
    # A report now, before anyone asked for a trial, sees it as half-open.
    assert subject.store.failure(c, None) == (HALF_OPEN, 0, None)
    assert subject.store.acquire(c, "a") == ("trial", 0, HALF_OPEN)
    answer, wait, transition = subject.store.acquire(c, "b")
    assert (answer, transition) == (HALF_OPEN, None)
    assert 0 < wait <= RESET * 1000  # min(lease left, reset): the lease is 60 s
    assert subject.store.peek(c) == (HALF_OPEN, 0)


def test_a_busy_half_open_says_when_the_first_lease_ends(subject: Subject) -> None:
    c = subject.circuit(lease=0.2, reset_timeout=RESET, half_open_max_calls=2)
    half_open(subject, c)
    assert subject.store.acquire(c, "a")[0] == "trial"
    time.sleep(0.05)
    assert subject.store.acquire(c, "b")[0] == "trial"
    answer, wait, _ = subject.store.acquire(c, "c")
    assert answer == HALF_OPEN and 150 - SLACK_MS <= wait <= 150 + 1


def test_a_trial_that_succeeds_closes_it(subject: Subject) -> None:
    c = subject.circuit()
    half_open(subject, c)
    assert subject.store.acquire(c, "a")[0] == "trial"
    assert subject.store.success(c, "a") == (CLOSED, 0, CLOSED)
    assert subject.store.peek(c) == (CLOSED, 0)
    assert subject.store.acquire(c, "b") == (CLOSED, 0, None)
    # Closed again with a fresh count: it takes fail_max failures to open it.
    assert subject.store.failure(c, None)[2] is None
    assert subject.store.failure(c, None)[2] is None
    assert subject.store.failure(c, None)[2] == OPEN


def test_a_trial_that_fails_opens_it_for_another_reset(subject: Subject) -> None:
    c = subject.circuit()
    half_open(subject, c)
    assert subject.store.acquire(c, "a")[0] == "trial"
    state, wait, transition = subject.store.failure(c, "a")
    assert (state, transition) == (OPEN, OPEN) and wait == pytest.approx(RESET * 1000, abs=1)
    answer, wait, _ = subject.store.acquire(c, "b")
    assert answer == "open" and RESET * 1000 - SLACK_MS <= wait <= RESET * 1000
    # The failed trial no longer holds anything.
    assert subject.store.success(c, "a") == (OPEN, pytest.approx(wait, abs=SLACK_MS), None)


def test_reports_of_non_trials_during_half_open_change_nothing(subject: Subject) -> None:
    c = subject.circuit(fail_max=1)
    half_open(subject, c)
    assert subject.store.acquire(c, "a")[0] == "trial"
    for token in (None, "stranger"):
        assert subject.store.failure(c, token) == (HALF_OPEN, 0, None)
        assert subject.store.success(c, token) == (HALF_OPEN, 0, None)
    assert subject.store.acquire(c, "b")[0] == HALF_OPEN  # "a" still holds the one trial
    assert subject.store.success(c, "a") == (CLOSED, 0, CLOSED)


def test_the_window_ending_starts_the_count_again(subject: Subject) -> None:
    c = subject.circuit(fail_max=3, failure_window=0.3)
    assert subject.store.failure(c, None)[2] is None
    assert subject.store.failure(c, None)[2] is None
    time.sleep(0.35)
    assert subject.store.failure(c, None)[2] is None  # the first of a new window
    assert subject.store.failure(c, None)[2] is None
    assert subject.store.failure(c, None)[2] == OPEN


def test_a_trial_whose_lease_ended_frees_its_slot_and_changes_nothing(subject: Subject) -> None:
    c = subject.circuit(lease=0.2)
    half_open(subject, c)
    assert subject.store.acquire(c, "a")[0] == "trial"
    assert subject.store.acquire(c, "b")[0] == HALF_OPEN
    time.sleep(0.25)
    assert subject.store.acquire(c, "b") == ("trial", 0, None)
    assert subject.store.success(c, "a") == (HALF_OPEN, 0, None)
    assert subject.store.failure(c, "a") == (HALF_OPEN, 0, None)
    assert subject.store.success(c, "b") == (CLOSED, 0, CLOSED)


def test_a_trial_given_back_frees_its_slot_and_changes_nothing(subject: Subject) -> None:
    c = subject.circuit()
    half_open(subject, c)
    assert subject.store.acquire(c, "a")[0] == "trial"
    assert subject.store.release(c, "stranger") == (HALF_OPEN, 0, None)
    assert subject.store.acquire(c, "b")[0] == HALF_OPEN  # "a" still holds it
    assert subject.store.release(c, "a") == (HALF_OPEN, 0, None)
    assert subject.store.success(c, "a") == (HALF_OPEN, 0, None)  # it holds nothing now
    assert subject.store.acquire(c, "b") == ("trial", 0, None)
    assert subject.store.success(c, "b") == (CLOSED, 0, CLOSED)
    assert subject.store.release(c, "b") == (CLOSED, 0, None)


@pytest.mark.parametrize("max_trials", [1, 3])
def test_concurrent_acquires_get_exactly_max_trials(subject: Subject, max_trials: int) -> None:
    c = subject.circuit(half_open_max_calls=max_trials)
    half_open(subject, c)
    callers = 24
    barrier = threading.Barrier(callers)
    answers: list[tuple[str, float, str | None]] = []
    lock = threading.Lock()

    def race(i: int) -> None:
        barrier.wait()
        answer = subject.store.acquire(c, f"token-{i}")
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(answers) == callers
    assert sum(a[0] == "trial" for a in answers) == max_trials
    assert sum(a[0] == HALF_OPEN for a in answers) == callers - max_trials
    assert sum(a[2] == HALF_OPEN for a in answers) == 1  # one caller made the transition


# -- the rate window ---------------------------------------------------------------------

#: Rates alone (fail_max out of the way), 50 % of at least 10 calls.
RATE = {"fail_max": 100_000, "failure_rate_threshold": 50, "minimum_calls": 10}


def test_a_failure_rate_opens_it_exactly_at_the_threshold(subject: Subject) -> None:
    c = subject.circuit(**RATE)
    assert subject.store.count(c, Calls(6, 2)) == (CLOSED, 0, None)
    assert subject.store.count(c, Calls(3, 2)) == (CLOSED, 0, None)  # 4 of 9: under minimum
    state, wait, transition = subject.store.count(c, Calls(1, 1))  # 5 of 10
    assert (state, transition) == (OPEN, OPEN) and wait == pytest.approx(RESET * 1000, abs=1)
    assert subject.store.peek(c)[0] == OPEN


def test_a_rate_under_its_threshold_or_under_minimum_calls_never_opens_it(
    subject: Subject,
) -> None:
    c = subject.circuit(**RATE)
    assert subject.store.count(c, Calls(9, 9, 9)) == (CLOSED, 0, None)  # 100 % of 9
    assert subject.store.count(c, Calls(12, 1)) == (CLOSED, 0, None)  # 10 of 21: 47.6 %
    assert subject.store.count(c, Calls(0)) == (CLOSED, 0, None)  # a look: still 47.6 %
    assert subject.store.count(c, Calls(1, 1))[2] == OPEN  # 11 of 22


def test_failures_carry_the_callers_counts_and_either_rule_opens_it(subject: Subject) -> None:
    c = subject.circuit(**RATE)
    assert subject.store.failure(c, None, Calls(9, 4)) == (CLOSED, 0, None)
    state, _, transition = subject.store.failure(c, None, Calls(1, 1))
    assert (state, transition) == (OPEN, OPEN)
    # fail_max still counts: 3 failures among 30 calls (10 %) open it.
    c = subject.circuit(fail_max=3, failure_rate_threshold=50)
    assert subject.store.failure(c, None, Calls(10, 1))[2] is None
    assert subject.store.failure(c, None, Calls(10, 1))[2] is None
    assert subject.store.failure(c, None, Calls(10, 1))[2] == OPEN


def test_slow_calls_open_it_by_their_rate_and_a_slow_failure_counts_in_both(
    subject: Subject,
) -> None:
    c = subject.circuit(
        fail_max=100_000, minimum_calls=4, slow_call_duration=1, slow_call_rate_threshold=75
    )
    assert subject.store.count(c, Calls(4, 4, 2)) == (CLOSED, 0, None)  # no failure-rate rule
    assert subject.store.failure(c, None, Calls(4, 1, 3)) == (CLOSED, 0, None)  # 5 of 8
    assert subject.store.count(c, Calls(4, 0, 4))[2] == OPEN  # 9 of 12 = 75 %
    both = subject.circuit(
        fail_max=100_000,
        minimum_calls=2,
        failure_rate_threshold=60,
        slow_call_duration=1,
        slow_call_rate_threshold=60,
    )
    assert subject.store.count(both, Calls(2, 1, 1))[2] is None  # 50 % of each
    assert subject.store.failure(both, None, Calls(1, 1, 1))[2] == OPEN  # 66 % of each


def test_buckets_slide_out_of_the_window(subject: Subject) -> None:
    settings = {**RATE, "failure_window": 0.5}  # buckets of 50 ms
    c = subject.circuit(**settings)
    assert subject.store.count(c, Calls(5, 5))[2] is None
    time.sleep(0.55)  # more than the window: that bucket has slid out
    assert subject.store.count(c, Calls(5, 0))[2] is None  # 0 of 5 now, not 5 of 10
    assert subject.store.count(c, Calls(5, 0))[2] is None  # 0 of 10
    within = subject.circuit(**settings)
    assert subject.store.count(within, Calls(5, 5))[2] is None
    assert subject.store.count(within, Calls(5, 0))[2] == OPEN  # 5 of 10, in the window


def test_counts_while_not_closed_change_nothing_and_a_closing_empties_the_window(
    subject: Subject,
) -> None:
    c = subject.circuit(**RATE)
    assert subject.store.count(c, Calls(8, 3)) == (CLOSED, 0, None)
    assert subject.store.count(c, Calls(2, 2))[2] == OPEN
    state, wait, transition = subject.store.count(c, Calls(100, 100, 100))
    assert (state, transition) == (OPEN, None) and 0 < wait <= RESET * 1000
    wait_for(lambda: subject.store.peek(c)[0] == HALF_OPEN, RESET + 2, "half-open", 0.01)
    assert subject.store.count(c, Calls(100, 100)) == (HALF_OPEN, 0, None)
    assert subject.store.acquire(c, "a")[0] == "trial"
    assert subject.store.count(c, Calls(100, 100)) == (HALF_OPEN, 0, None)
    assert subject.store.success(c, "a") == (CLOSED, 0, CLOSED)
    # Nothing from before: 9 failures of 9 calls are under minimum_calls.
    assert subject.store.count(c, Calls(9, 9)) == (CLOSED, 0, None)
    assert subject.store.count(c, Calls(11, 0)) == (CLOSED, 0, None)  # 9 of 20: 45 %


# -- Redis only -----------------------------------------------------------------------


def test_every_key_has_the_hash_tag_and_a_ttl_covering_its_state(on_redis: Subject) -> None:
    assert on_redis.client is not None
    # A trial lease (10 minutes: a long time_limit) longer than the idle TTL (60 s).
    c = on_redis.circuit(lease=600.0, half_open_max_calls=2)
    on_redis.store.failure(c, None)
    (state_key,) = on_redis.keys(c)
    assert 59_000 < on_redis.client.pttl(state_key) <= 60_000  # max(2 x reset, window, 60 s)
    half_open(on_redis, c)
    assert on_redis.store.acquire(c, "a")[0] == "trial"
    keys = on_redis.keys(c)
    assert len(keys) == 2
    for key in keys:
        assert f"{{breaker:{c.name}}}".encode() in key
        assert on_redis.client.pttl(key) > 0, key
    leases = [k for k in keys if b":trial:" in k]
    assert len(leases) == 1 and on_redis.client.get(leases[0]) == b"a"
    # The record outlives the lease: a long trial never finds its breaker gone (closed).
    assert on_redis.client.pttl(state_key) >= on_redis.client.pttl(leases[0])
    on_redis.store.success(c, "a")
    assert on_redis.keys(c) == [state_key]  # the leases went with the trial
    assert on_redis.client.pttl(state_key) > 0


def test_the_rate_window_lives_in_the_record_under_its_ttl(on_redis: Subject) -> None:
    """No key of its own: deleting the record (``reset_breaker``) forgets the counts too."""
    assert on_redis.client is not None
    c = on_redis.circuit(**RATE)
    on_redis.store.count(c, Calls(3, 1, 0))
    on_redis.store.count(c, Calls(2, 0, 0))
    (state_key,) = on_redis.keys(c)
    assert state_key == f"bulkhead:{{breaker:{c.name}}}:state".encode()
    record = {k.decode(): int(v) for k, v in on_redis.client.hgetall(state_key).items()}
    buckets = {k for k in record if ":" in k}
    assert {k.split(":")[1] for k in buckets} == {"c", "f"}  # no slow call: no field
    assert sum(v for k, v in record.items() if k.endswith(":c")) == 5
    assert 59_000 < on_redis.client.pttl(state_key) <= 60_000
    on_redis.store.count(c, Calls(5, 5))  # opens: the counts go, the record stays
    fields = {k.decode() for k in on_redis.client.hkeys(state_key)}
    assert fields == {"state", "failures", "window_start", "opened_at"}


def test_buckets_that_slid_out_are_deleted(on_redis: Subject) -> None:
    assert on_redis.client is not None
    c = on_redis.circuit(**{**RATE, "failure_window": 0.5})
    on_redis.store.count(c, Calls(1))
    (state_key,) = on_redis.keys(c)
    first = {k for k in on_redis.client.hkeys(state_key)}
    time.sleep(0.55)
    on_redis.store.count(c, Calls(1))
    assert first.isdisjoint(on_redis.client.hkeys(state_key))
    assert len(on_redis.client.hkeys(state_key)) == 1


def test_a_closed_breaker_without_failures_writes_nothing(on_redis: Subject) -> None:
    c = on_redis.circuit()
    for _ in range(5):
        on_redis.store.peek(c)
        on_redis.store.acquire(c, "t")
        on_redis.store.success(c, None)
        on_redis.store.success(c, "t")
    assert on_redis.keys(c) == []


def test_callers_clocks_do_not_matter(on_redis: Subject, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis server time decides: a caller an hour ahead or behind sees the same breaker."""
    c = on_redis.circuit(reset_timeout=2)
    real_time, real_monotonic = time.time, time.monotonic
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    monkeypatch.setattr(time, "monotonic", lambda: real_monotonic() + 3600)
    ahead = RedisBreakerStore(REDIS_URL, timeout=2)
    for _ in range(3):
        ahead.failure(c, None)
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600)
    monkeypatch.setattr(time, "monotonic", lambda: real_monotonic() - 3600)
    behind = RedisBreakerStore(REDIS_URL, timeout=2)
    state, wait = behind.peek(c)
    assert state == OPEN and 2000 - SLACK_MS <= wait <= 2000
    assert behind.acquire(c, "t")[0] == "open"
    monkeypatch.undo()
    assert on_redis.store.peek(c)[0] == OPEN


def _acquire_at_once(
    barrier: Any, name: str, max_trials: int, token: str, answers: Any
) -> None:  # pragma: no cover - runs in a child process
    store = RedisBreakerStore(REDIS_URL, timeout=5)
    circuit = SimpleNamespace(
        name=name,
        breaker=Breaker(fail_max=3, reset_timeout=RESET, half_open_max_calls=max_trials),
        lease=60.0,
    )
    store.peek(circuit)  # connected and the script loaded before the race
    barrier.wait()
    answers.put(store.acquire(circuit, token))


@pytest.mark.parametrize("max_trials", [1, 2])
def test_processes_racing_at_the_reset_time_get_at_most_max_trials(
    on_redis: Subject, max_trials: int
) -> None:
    c = on_redis.circuit(half_open_max_calls=max_trials)
    processes = 32
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(processes + 1)
    answers = context.Queue()
    children = [
        context.Process(
            target=_acquire_at_once, args=(barrier, c.name, max_trials, f"p{i}", answers)
        )
        for i in range(processes)
    ]
    for child in children:
        child.start()
    try:
        half_open(on_redis, c)  # the reset time has passed: now all at once
        barrier.wait(timeout=30)
        results = [answers.get(timeout=30) for _ in range(processes)]
    finally:
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
    trials = [r for r in results if r[0] == "trial"]
    assert len(trials) == max_trials
    assert sum(r[2] == HALF_OPEN for r in results) == 1
    assert {r[0] for r in results} == {"trial", HALF_OPEN}
