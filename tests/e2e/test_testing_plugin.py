"""The pytest plugin as a user meets it: a user's test file, run by pytest in a subprocess.

The file below is what a user would write: an app with pools, tests that run
a pool's worker in-process, that check refusals, and that switch bulkheads
off or run eagerly.  It runs on ``memory://`` and on a real Redis (its own
database, names unique to the run), with nothing but the installed plugin:
no conftest, no import of the fixtures.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.support import BROKERS

pytest_plugins = ["pytester"]

USER_TESTS = """
import time

import pytest
from celery import Celery

from celery_bulkhead import Breaker, Bulkhead, Pool, TenantLimit
from celery_bulkhead.testing import (
    assert_pool_full, drain, expect_circuit_open, expect_pool_full, expect_tenant_limited,
    fill_pool, reset_breaker, reset_tenant, trip_breaker,
)

BROKER = "{broker}"
PAY, HOOKS = "pay-{tag}", "hooks-{tag}"

app = Celery("userapp", broker=BROKER, set_as_current=False)
app.conf.task_default_queue = "default-{tag}"
bulkhead = Bulkhead(app, pools=[
    Pool(PAY, max_queue=2, concurrency=2, worker_pool="threads"),
    Pool(HOOKS, max_queue=5, on_full="drop",
         tenant=TenantLimit(key="tenant_id", rate="1/h", burst=2),
         breaker=Breaker(fail_max=3, reset_timeout=30, fail_fast_at_submit=True)),
])
ran = []


@app.task(bulkhead=PAY, shared=False)
def charge(amount):
    ran.append(amount)
    return amount


@app.task(bulkhead=HOOKS, shared=False)
def deliver(tenant_id, url):
    ran.append(url)


@pytest.fixture(autouse=True)
def empty_pools():
    yield
    for pool in (PAY, HOOKS):
        drain(app, pool)


def test_the_pool_worker_runs_a_payment(bulkhead_worker):
    with bulkhead_worker(app, PAY) as worker:
        assert worker.concurrency == 2
        charge.delay(5)
        deadline = time.monotonic() + 10
        while 5 not in ran and time.monotonic() < deadline:
            time.sleep(0.02)
    assert 5 in ran


def test_a_full_pool_refuses(bulkhead_worker):
    assert fill_pool(app, PAY) == 2
    with expect_pool_full(pool=PAY) as caught:
        charge.delay(1)
    assert (caught.error.depth, caught.error.cap) == (2, 2)
    fill_pool(app, HOOKS)
    assert assert_pool_full(lambda: deliver.delay(tenant_id="x", url="u")).cap == 5


def test_a_tenant_over_its_limit_is_refused():
    deliver.delay(tenant_id="acme", url="/1")
    deliver.delay(tenant_id="acme", url="/1")  # burst=2
    with expect_tenant_limited(pool=HOOKS, tenant="acme") as caught:
        deliver.delay(tenant_id="acme", url="/2")
    assert caught.error.retry_after > 3000
    reset_tenant(app, HOOKS, "acme")
    deliver.delay(tenant_id="acme", url="/3")
    reset_tenant(app, HOOKS, "acme")


def test_an_open_breaker_fails_fast():
    trip_breaker(app, HOOKS)
    with expect_circuit_open(pool=HOOKS):
        deliver.delay(tenant_id="acme", url="/4")
    reset_breaker(app, HOOKS)


def test_bulkheads_off(bulkheads_disabled):
    fill_pool(app, PAY)
    trip_breaker(app, HOOKS)
    charge.delay(3)
    for url in ("/5", "/6", "/7"):
        deliver.delay(tenant_id="acme", url=url)
    reset_breaker(app, HOOKS)
    reset_tenant(app, HOOKS, "acme")


def test_eager(bulkhead_eager):
    bulkhead_eager(app)
    fill_pool(app, PAY)
    assert charge.delay(7).get() == 7


def test_a_wrong_expectation_fails_clearly():
    with expect_pool_full(pool=PAY):
        charge.delay(8)
"""

CELERY_APP_FIXTURE_TEST = """
from celery_bulkhead import Bulkhead, Pool


def test_on_celerys_own_celery_app_fixture(celery_app, bulkhead_worker):
    Bulkhead(celery_app, pools=[Pool("solo-{tag}", worker_pool="solo")])

    @celery_app.task(bulkhead="solo-{tag}")
    def hello():
        return "hi"

    with bulkhead_worker(celery_app, "solo-{tag}"):
        assert hello.delay().get(timeout=10) == "hi"
"""


@pytest.fixture
def tag() -> str:
    return f"plugin{uuid.uuid4().hex[:10]}"


@pytest.fixture
def redis_names(tag: str) -> Iterator[None]:
    """Delete every key and kombu binding entry the run made (they all carry the tag)."""
    yield
    client = redis.Redis.from_url(BROKERS["redis"])
    keys = list(client.scan_iter(match=f"*{tag}*"))
    if keys:
        client.delete(*keys)
    for key in client.scan_iter(match="_kombu.binding.*"):
        stale = [m for m in client.smembers(key) if tag.encode() in m]
        if stale:
            client.srem(key, *stale)


def _run(pytester: pytest.Pytester, broker: str, tag: str) -> pytest.RunResult:
    pytester.makepyfile(test_user=USER_TESTS.replace("{broker}", broker).replace("{tag}", tag))
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")


def _check(result: pytest.RunResult, passed: int = 6) -> None:
    result.assert_outcomes(passed=passed, failed=1)
    result.stdout.fnmatch_lines(["E * AssertionError: DID NOT RAISE PoolFull*"])


def test_a_users_suite_on_memory(pytester: pytest.Pytester, tag: str) -> None:
    """memory://: the user's tests pass (and the wrong one fails with a clear message)."""
    pytester.makepyfile(test_celery_app=CELERY_APP_FIXTURE_TEST.replace("{tag}", tag))
    _check(_run(pytester, "memory://", tag), passed=7)


def test_a_users_suite_on_redis(pytester: pytest.Pytester, tag: str, redis_names: None) -> None:
    """A real Redis: caps in the Lua push, tenant and breaker state in Redis, a real consumer."""
    _check(_run(pytester, BROKERS["redis"], tag))
