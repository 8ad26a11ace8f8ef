"""The tenant-store contract, on every store: in-process memory and Redis (one Lua call each).

Both stores answer the same five operations the same way: a bucket admits
its burst at once and then one request per interval, telling a refused
request exactly how long to wait; reservations within a horizon are spaced
at the interval; at most ``limit`` leases are held at once, a lease is
renewed by its holder, freed by release or by expiry; the throttle ranking
is bounded.  Redis keys never outlive the state they hold.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from celery_bulkhead.tenants import MIN_RATE, bucket_key, lease_key
from celery_bulkhead.tenants.bucket import Take
from celery_bulkhead.tenants.memory import MemoryStore
from celery_bulkhead.tenants.redis import THROTTLED_TTL, RedisStore, throttled_key
from tests.support import wait_for

REDIS_URL = "redis://127.0.0.1:6379/9"
#: Clock noise allowed between Redis time (µs) and this process's monotonic clock.
SLACK = 0.005


@dataclass
class Store:
    """A store under test, with its own pool name (so its own keys)."""

    kind: str
    store: Any
    pool: str
    client: redis.Redis | None

    def bucket(self, tenant: str = "acme") -> str:
        return bucket_key(self.pool, tenant)

    def leases(self, tenant: str = "acme") -> str:
        return lease_key(self.pool, tenant)

    def take(self, interval: float, burst: int, horizon: float = 0.0, tenant: str = "acme") -> Take:
        result: Take = self.store.take(self.bucket(tenant), interval, burst, horizon)
        return result

    def key_names(self) -> list[bytes]:
        assert self.client is not None
        return list(self.client.scan_iter(match=f"bulkhead:{{{self.pool}*", count=1000))

    def live(self) -> int:
        """Entries the store still holds for this pool."""
        if self.client is None:
            return int(self.store.size())
        return len([k for k in self.key_names() if not k.endswith(b":throttled")])


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    pool = f"contract-{uuid.uuid4().hex[:10]}"
    if request.param == "memory":
        yield Store("memory", MemoryStore(), pool, None)
        return
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()  # a missing Redis fails here, loudly
    under_test = RedisStore(REDIS_URL, timeout=2)
    yield Store("redis", under_test, pool, client)
    leftover = list(client.scan_iter(match=f"bulkhead:{{{pool}*", count=1000))
    if leftover:
        client.delete(*leftover)
    client.close()


def taken_until_refused(store: Store, interval: float, burst: int, most: int) -> list[Take]:
    results = []
    for _ in range(most):
        results.append(store.take(interval, burst))
        if not results[-1].allowed:
            break
    return results


# -- the bucket ------------------------------------------------------------------------


def test_a_full_bucket_admits_its_burst_then_refuses_for_one_interval(store: Store) -> None:
    interval, burst = 0.2, 3
    started = time.monotonic()
    results = taken_until_refused(store, interval, burst, most=10)
    elapsed = time.monotonic() - started
    assert [r.allowed for r in results] == [True] * burst + [False]
    assert all(r.wait == 0 for r in results[:burst])
    retry_after = results[-1].wait
    # The next token is one interval after the first take: no more, barely less.
    assert interval - elapsed - SLACK <= retry_after <= interval + 1e-6


def test_a_token_comes_back_after_retry_after_and_not_before(store: Store) -> None:
    interval, burst = 0.25, 2
    taken_until_refused(store, interval, burst, most=5)
    refused_at = time.monotonic()  # the refusal is decided after this
    refused = store.take(interval, burst)
    assert not refused.allowed
    wait_for(lambda: store.take(interval, burst).allowed, 5, "the next token", interval=0.005)
    waited = time.monotonic() - refused_at
    assert refused.wait - 0.002 <= waited <= refused.wait + 0.5
    assert not store.take(interval, burst).allowed  # one token, not a refill


def test_a_refused_request_takes_nothing(store: Store) -> None:
    interval, burst = 0.5, 1
    assert store.take(interval, burst).allowed
    first = store.take(interval, burst)
    for _ in range(20):
        again = store.take(interval, burst)
        assert not again.allowed
        assert again.wait <= first.wait + 1e-6  # hammering does not push the token away


def test_a_bucket_refills_to_its_burst_never_more(store: Store) -> None:
    interval, burst = 0.05, 3
    taken_until_refused(store, interval, burst, most=10)
    # A bucket's entry expires exactly when the bucket is full again.
    wait_for(lambda: store.live() == 0, 5, "a full refill", interval=0.01)
    results = taken_until_refused(store, interval, burst, most=10)
    assert [r.allowed for r in results] == [True] * burst + [False]


def test_tenants_have_separate_buckets(store: Store) -> None:
    interval, burst = 1.0, 2
    taken_until_refused(store, interval, burst, most=5)
    assert not store.take(interval, burst, tenant="acme").allowed
    assert store.take(interval, burst, tenant="globex").allowed
    assert store.take(interval, burst, tenant="globex").allowed
    assert not store.take(interval, burst, tenant="globex").allowed


def test_reservations_within_the_horizon_are_spaced_at_the_interval(store: Store) -> None:
    interval, burst, horizon = 0.2, 2, 0.7
    started = time.monotonic()
    results = [store.take(interval, burst, horizon) for _ in range(5)]
    refused = store.take(interval, burst, horizon)
    elapsed = time.monotonic() - started
    assert all(r.allowed for r in results)
    waits = [r.wait for r in results]
    assert waits[:2] == [0.0, 0.0]
    for k, wait in enumerate(waits[2:], start=1):  # slots at 1, 2, 3 intervals
        assert k * interval - elapsed - SLACK <= wait <= k * interval + 1e-6
    assert not refused.allowed  # the 4th interval is beyond the horizon
    assert 4 * interval - elapsed - SLACK <= refused.wait <= 4 * interval + 1e-6
    again = store.take(interval, burst, horizon)
    assert not again.allowed and again.wait <= refused.wait + 1e-6  # nothing was reserved


def test_the_slowest_rate_still_counts(store: Store) -> None:
    interval = 1 / MIN_RATE  # about 11.6 days per request
    assert store.take(interval, 2).allowed
    assert store.take(interval, 2).allowed
    refused = store.take(interval, 2)
    assert not refused.allowed
    assert refused.wait == pytest.approx(interval, abs=1.0)
    if store.client is not None:
        assert client_pttl(store) == pytest.approx(2 * interval * 1000, abs=1000)


def client_pttl(store: Store) -> int:
    assert store.client is not None
    return int(store.client.pttl(store.bucket()))


# -- leases ----------------------------------------------------------------------------


def test_at_most_limit_leases_are_held_at_once(store: Store) -> None:
    key = store.leases()
    assert store.store.lease(key, "task-1", 2, 30.0) == (True, 0.0)
    assert store.store.lease(key, "task-2", 2, 30.0) == (True, 0.0)
    held, wait = store.store.lease(key, "task-3", 2, 30.0)
    assert not held
    assert 30.0 - 1.0 <= wait <= 30.0  # until the earliest lease ends
    assert not store.store.lease(key, "task-4", 2, 30.0)[0]


def test_the_holder_renews_its_own_lease(store: Store) -> None:
    key = store.leases()
    assert store.store.lease(key, "task-1", 1, 30.0)[0]
    assert store.store.lease(key, "task-1", 1, 30.0) == (True, 0.0)  # not a second slot
    assert not store.store.lease(key, "task-2", 1, 30.0)[0]


def test_release_frees_a_slot_and_is_idempotent(store: Store) -> None:
    key = store.leases()
    assert store.store.lease(key, "task-1", 1, 30.0)[0]
    assert not store.store.lease(key, "task-2", 1, 30.0)[0]
    store.store.release(key, "task-1")
    store.store.release(key, "task-1")
    store.store.release(key, "never-held")
    assert store.store.lease(key, "task-2", 1, 30.0)[0]
    assert not store.store.lease(key, "task-1", 1, 30.0)[0]


def test_an_expired_lease_frees_its_slot(store: Store) -> None:
    # A worker killed with kill -9 never releases: its lease ends on its own.
    key = store.leases()
    leased_at = time.monotonic()  # the lease is taken after this, and ends 0.3 s later
    assert store.store.lease(key, "crashed", 1, 0.3)[0]
    held, wait = store.store.lease(key, "task-2", 1, 0.3)
    assert not held and 0 < wait <= 0.3
    wait_for(lambda: store.store.lease(key, "task-2", 1, 0.3)[0], 5, "the expired slot", 0.01)
    assert time.monotonic() - leased_at >= 0.3 - 0.002  # Redis counts whole milliseconds


def test_leases_of_tenants_are_separate(store: Store) -> None:
    assert store.store.lease(store.leases("acme"), "t1", 1, 30.0)[0]
    assert store.store.lease(store.leases("globex"), "t2", 1, 30.0)[0]
    assert not store.store.lease(store.leases("acme"), "t3", 1, 30.0)[0]


# -- the throttle ranking ----------------------------------------------------------------


def test_the_most_throttled_tenants_come_first(store: Store) -> None:
    for tenant, times in (("acme", 3), ("globex", 1), ("initech", 2)):
        for _ in range(times):
            store.store.note_throttled(store.pool, tenant)
    assert store.store.most_throttled(store.pool, 2) == [("acme", 3), ("initech", 2)]
    assert store.store.most_throttled(store.pool, 10) == [
        ("acme", 3),
        ("initech", 2),
        ("globex", 1),
    ]
    assert store.store.most_throttled(store.pool, 0) == []
    assert store.store.most_throttled(f"{store.pool}-other", 5) == []


def test_the_throttle_ranking_is_bounded(store: Store) -> None:
    for _ in range(5):
        store.store.note_throttled(store.pool, "flood")
    for i in range(260):
        store.store.note_throttled(store.pool, f"one-shot-{i}")
    ranking = store.store.most_throttled(store.pool, 1000)
    assert 1 < len(ranking) <= 200
    assert ranking[0] == ("flood", 5)


# -- nothing left behind ---------------------------------------------------------------


def test_an_idle_tenant_leaves_nothing_behind(store: Store) -> None:
    for tenant in ("a", "b", "c"):
        store.take(0.02, 2, tenant=tenant)
        store.take(0.02, 2, tenant=tenant)
    store.store.lease(store.leases("a"), "task-1", 2, 0.1)
    store.store.lease(store.leases("b"), "task-2", 2, 30.0)
    store.store.release(store.leases("b"), "task-2")
    assert store.live() > 0
    wait_for(lambda: store.live() == 0, 5, "every bucket and lease to expire", 0.02)


def test_every_redis_key_expires_with_the_state_it_holds(store: Store) -> None:
    if store.client is None:
        assert store.kind == "memory"  # no keys: the memory store is checked by size()
        return
    client = store.client
    interval, burst = 0.5, 4
    started = time.monotonic()
    for n in range(1, burst + 1):
        store.take(interval, burst)
        pttl = client.pttl(store.bucket())
        # A bucket lives until it is full again: n spent tokens, n intervals.
        assert 0 < pttl <= n * interval * 1000 + 1
        assert pttl >= (n * interval - (time.monotonic() - started)) * 1000 - 2
    store.take(interval, burst)  # refused: the TTL is unchanged, not extended
    assert client.pttl(store.bucket()) <= burst * interval * 1000 + 1
    # A reservation keeps the bucket until the reserved slot is refilled too.
    reserved = store.take(interval, burst, horizon=5.0)
    assert reserved.allowed and reserved.wait > 0
    assert 0 < client.pttl(store.bucket()) <= (burst * interval + reserved.wait) * 1000 + 1
    key = store.leases()
    store.store.lease(key, "short", 5, 2.0)
    store.store.lease(key, "long", 5, 10.0)
    store.store.lease(key, "middle", 5, 5.0)
    assert 9000 < client.pttl(key) <= 10_000  # the last lease's end
    store.store.release(key, "long")
    store.store.lease(key, "middle", 5, 5.0)  # a renewal moves the expiry to the last lease
    assert 4000 < client.pttl(key) <= 5000
    store.store.note_throttled(store.pool, "acme")
    assert 0 < client.ttl(throttled_key(store.pool)) <= THROTTLED_TTL
    for name in store.key_names():
        assert client.pttl(name) > 0, name  # -1 would be a key kept forever
