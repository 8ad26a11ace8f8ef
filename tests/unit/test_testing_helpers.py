"""``celery_bulkhead.testing`` on ``memory://`` apps: fill and expect, shared state, off, eager."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import AlwaysEagerIgnored

from celery_bulkhead import (
    Breaker,
    Bulkhead,
    CircuitOpen,
    ConfigurationError,
    Pool,
    PoolFull,
    TenantLimit,
    TenantLimited,
)
from celery_bulkhead.testing import (
    assert_pool_full,
    assert_tenant_limited,
    bulkheads_disabled,
    drain,
    eager,
    expect_circuit_open,
    expect_pool_full,
    expect_tenant_limited,
    fill_pool,
    is_enabled,
    pool_worker,
    reset_breaker,
    reset_tenant,
    set_enabled,
    trip_breaker,
)
from tests.support import ROOT


@dataclass
class Shop:
    """A memory:// app with one pool per kind of refusal, its queues unique to the test."""

    app: Celery
    bulkhead: Bulkhead
    tasks: dict[str, Any]
    ran: list[Any]


@pytest.fixture
def shop() -> Iterator[Shop]:
    tag = uuid.uuid4().hex[:10]
    app = Celery("helpers", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.task_default_queue = f"default-{tag}"
    bulkhead = Bulkhead(
        app,
        pools=[
            Pool("capped", queue=f"capped-{tag}", max_queue=3, worker_pool="threads"),
            Pool("dropping", queue=f"dropping-{tag}", max_queue=2, on_full="drop"),
            Pool("open", queue=f"open-{tag}"),
            Pool(
                "tenants",
                queue=f"tenants-{tag}",
                tenant=TenantLimit(key="tenant_id", rate="1/h", burst=2),
            ),
            Pool(
                "guarded",
                queue=f"guarded-{tag}",
                worker_pool="threads",
                breaker=Breaker(
                    name="downstream", fail_max=2, reset_timeout=60, fail_fast_at_submit=True
                ),
            ),
            Pool(
                "failing",
                queue=f"failing-{tag}",
                worker_pool="threads",
                breaker=Breaker(fail_max=1, reset_timeout=60, on_open="fail"),
            ),
        ],
    )
    ran: list[Any] = []
    tasks: dict[str, Any] = {}
    for pool in ("capped", "dropping", "open", "tenants", "guarded", "failing"):

        def run(tenant_id: str = "-", _pool: str = pool) -> str:
            ran.append((_pool, tenant_id))
            return f"{_pool} ran"

        tasks[pool] = app.task(run, name=f"helpers.{pool}", bulkhead=pool, shared=False)

    @app.task(name="helpers.nopool", shared=False)
    def nopool() -> str:
        ran.append(("nopool", "-"))
        return "ran"

    tasks["nopool"] = nopool
    yield Shop(app, bulkhead, tasks, ran)
    for pool in bulkhead.pools:
        drain(app, pool.name)


# -- fill_pool and drain ------------------------------------------------------------------


def test_fill_pool_fills_a_capped_pool_exactly_then_the_next_publish_is_refused(shop: Shop) -> None:
    assert fill_pool(shop.app, "capped") == 3
    with expect_pool_full(pool="capped", depth=3, cap=3) as caught:
        shop.tasks["capped"].delay()
    assert caught.error.pool == "capped"
    assert caught.value is caught.error
    assert fill_pool(shop.bulkhead, "capped") == 0, "already full: nothing more"


def test_fill_pool_with_n_publishes_n_and_never_beyond_the_cap(shop: Shop) -> None:
    assert fill_pool(shop.app, "capped", n=2) == 2
    shop.tasks["capped"].delay()  # the third fits
    with expect_pool_full(pool="capped"):
        shop.tasks["capped"].delay()
    assert drain(shop.app, "capped") == 3
    assert fill_pool(shop.app, "capped", n=10) == 3


def test_fill_pool_needs_n_for_a_pool_without_a_cap(shop: Shop) -> None:
    with pytest.raises(ConfigurationError, match="max_queue"):
        fill_pool(shop.app, "open")
    assert fill_pool(shop.app, "open", n=4) == 4
    assert drain(shop.app, "open") == 4
    with pytest.raises(ConfigurationError, match="n="):
        fill_pool(shop.app, "open", n=-1)


def test_drain_empties_a_full_pool_so_publishes_are_admitted_again(shop: Shop) -> None:
    fill_pool(shop.app, "capped")
    assert drain(shop.app, "capped") == 3
    assert drain(shop.app, "capped") == 0
    shop.tasks["capped"].delay()


def test_an_unknown_pool_is_a_configuration_error(shop: Shop) -> None:
    with pytest.raises(ConfigurationError, match="nosuch"):
        fill_pool(shop.app, "nosuch")
    with pytest.raises(ConfigurationError):
        fill_pool(Celery("bare", broker="memory://", set_as_current=False), "capped")


# -- expecting refusals -------------------------------------------------------------------


def test_assert_pool_full_accepts_a_drop_and_returns_its_error(shop: Shop) -> None:
    fill_pool(shop.app, "dropping")
    error = assert_pool_full(shop.tasks["dropping"].delay, pool="dropping")
    assert isinstance(error, PoolFull)
    assert (error.depth, error.cap) == (2, 2)
    fill_pool(shop.app, "capped")
    assert assert_pool_full(shop.tasks["capped"].delay).pool == "capped"


def test_expectations_fail_when_nothing_is_refused_or_the_wrong_pool_refuses(shop: Shop) -> None:
    with pytest.raises(AssertionError, match="DID NOT RAISE PoolFull"), expect_pool_full():
        shop.tasks["capped"].delay()
    fill_pool(shop.app, "dropping")
    with pytest.raises(AssertionError, match="DroppedResult"), expect_pool_full():
        assert shop.tasks["dropping"].delay().dropped
    fill_pool(shop.app, "capped")
    with pytest.raises(AssertionError, match="pool='other'"), expect_pool_full(pool="other"):
        shop.tasks["capped"].delay()
    with pytest.raises(AssertionError, match="DID NOT REFUSE"):
        assert_pool_full(shop.tasks["open"].delay)
    with pytest.raises(TenantLimited), expect_pool_full():
        raise TenantLimited("tenants", "acme", 1.0)  # another refusal is not swallowed


def test_expect_tenant_limited_and_reset_tenant(shop: Shop) -> None:
    limited = shop.tasks["tenants"]
    limited.delay(tenant_id="acme")
    limited.delay(tenant_id="acme")  # burst=2
    with expect_tenant_limited(pool="tenants", tenant="acme") as caught:
        limited.delay(tenant_id="acme")
    assert caught.error.retry_after > 0
    limited.delay(tenant_id="globex")  # another tenant has its own budget
    assert assert_tenant_limited(lambda: limited.delay(tenant_id="acme")).tenant == "acme"
    reset_tenant(shop.app, "tenants", "acme")
    limited.delay(tenant_id="acme")
    with pytest.raises(ConfigurationError):
        reset_tenant(shop.app, "capped", "acme")


def test_trip_breaker_opens_it_for_its_reset_timeout_and_reset_breaker_closes_it(
    shop: Shop,
) -> None:
    guarded = shop.tasks["guarded"]
    guarded.delay()
    retry_after = trip_breaker(shop.app, "downstream")
    assert 59 < retry_after <= 60
    with expect_circuit_open(pool="guarded", breaker="downstream") as caught:
        guarded.delay()
    assert 59 < caught.error.retry_after <= 60
    assert 59 < trip_breaker(shop.bulkhead, "guarded") <= 60, "a pool's name finds its breaker"
    reset_breaker(shop.app, "downstream")
    guarded.delay()
    with pytest.raises(ConfigurationError):
        trip_breaker(shop.app, "capped")


def test_trip_breaker_tells_the_breaker_listeners() -> None:
    changes: list[tuple[str, str]] = []

    class Listener:
        def state_change(self, breaker: Any, old: Any, new: Any) -> None:
            changes.append((old.name, new.name))

    app = Celery("listened", broker="memory://", set_as_current=False)
    Bulkhead(
        app,
        pools=[
            Pool("b", queue=f"b-{uuid.uuid4().hex[:8]}", breaker=Breaker(listeners=(Listener(),)))
        ],
    )
    trip_breaker(app, "b")
    reset_breaker(app, "b")
    assert changes == [("closed", "open"), ("open", "closed")]


# -- off ---------------------------------------------------------------------------------


def test_bulkheads_disabled_lets_every_publish_through_to_the_pools_queue(shop: Shop) -> None:
    fill_pool(shop.app, "capped")
    fill_pool(shop.app, "dropping")
    trip_breaker(shop.app, "downstream")
    for _ in range(2):
        shop.tasks["tenants"].delay(tenant_id="acme")
    with bulkheads_disabled(shop.app):
        assert not is_enabled(shop.app)
        shop.tasks["capped"].delay()
        assert not shop.tasks["dropping"].delay().dropped
        shop.tasks["guarded"].delay()
        shop.tasks["tenants"].delay(tenant_id="acme")
    assert is_enabled(shop.app)
    assert drain(shop.app, "capped") == 4, "routed to the pool's queue as usual"
    with expect_pool_full(pool="capped"):
        fill_pool(shop.app, "capped")
        shop.tasks["capped"].delay()
    with expect_circuit_open():
        shop.tasks["guarded"].delay()
    with expect_tenant_limited():
        shop.tasks["tenants"].delay(tenant_id="acme")


def test_bulkheads_disabled_restores_the_state_when_the_block_raises(shop: Shop) -> None:
    with pytest.raises(RuntimeError), bulkheads_disabled(shop.app):
        with bulkheads_disabled(shop.bulkhead):
            pass
        assert not is_enabled(shop.app), "still off after the nested block"
        raise RuntimeError
    assert is_enabled(shop.app)


def test_set_enabled_switches_every_app_including_later_ones(shop: Shop) -> None:
    fill_pool(shop.app, "capped")
    set_enabled(False)
    try:
        assert not is_enabled()
        shop.tasks["capped"].delay()
        later = Celery("later", broker="memory://", set_as_current=False)
        queue = f"later-{uuid.uuid4().hex[:8]}"
        Bulkhead(later, pools=[Pool("p", queue=queue, max_queue=1)])
        fill_pool(later, "p", n=1)
        later.send_task("later.anything", queue=queue)
        assert drain(later, "p") == 2
    finally:
        set_enabled(True)
    assert is_enabled() and is_enabled(shop.app)
    with expect_pool_full():
        shop.tasks["capped"].delay()


def test_the_bulkheads_disabled_fixture_switches_off_for_one_test(
    shop: Shop, bulkheads_disabled: None
) -> None:
    fill_pool(shop.app, "capped")
    shop.tasks["capped"].delay()
    assert not is_enabled()


def test_after_the_fixture_bulkheads_are_on_again() -> None:
    assert is_enabled()


# -- eager ---------------------------------------------------------------------------------


def test_eager_runs_tasks_in_the_caller_and_never_meets_admission(shop: Shop) -> None:
    fill_pool(shop.app, "capped")
    with eager(shop.app):
        assert shop.tasks["capped"].delay().get() == "capped ran"
        # send_task always publishes (Celery's rule), so it still meets the cap.
        with pytest.warns(AlwaysEagerIgnored), expect_pool_full(pool="capped"):
            shop.app.send_task("helpers.capped")
    assert shop.ran == [("capped", "-")]
    assert drain(shop.app, "capped") == 3, "nothing was published"
    assert not shop.app.conf.task_always_eager, "restored"


def test_the_bulkhead_eager_fixture(shop: Shop, bulkhead_eager: Any) -> None:
    assert bulkhead_eager(shop.bulkhead) is shop.bulkhead
    assert shop.app.conf.task_always_eager and shop.app.conf.task_eager_propagates
    trip_breaker(shop.app, "downstream")
    assert shop.tasks["guarded"].delay().get() == "guarded ran"


# -- the in-process pool worker ---------------------------------------------------------------


def test_pool_worker_runs_its_pools_tasks_and_consumes_nothing_else(shop: Shop) -> None:
    shop.tasks["nopool"].delay()
    shop.tasks["open"].delay()
    fill_pool(shop.app, "capped", n=1)  # a filler: discarded by the worker, never run
    task = shop.tasks["capped"]
    with pool_worker(shop.app, "capped") as worker:
        assert worker.concurrency == 1
        assert task.delay().get(timeout=10) == "capped ran"
        assert task.acks_late is True and "capped" in task.Request.__name__
    assert shop.ran == [("capped", "-")]
    assert drain(shop.app, "open") == 1 and drain(shop.app, "capped") == 0
    assert "Request" not in vars(task), "the worker's changes to the task are undone"
    queues: Any = shop.app.amqp.queues
    assert queues._consume_from is None, "the queue selection is undone"


def test_the_bulkhead_worker_fixture_stops_what_it_started(
    shop: Shop, bulkhead_worker: Any
) -> None:
    worker = bulkhead_worker(shop.app, "capped", concurrency=2)
    controller = worker.start()
    assert controller.concurrency == 2
    assert shop.tasks["capped"].delay().get(timeout=10) == "capped ran"
    with pytest.raises(RuntimeError, match="one in-process worker at a time"):
        pool_worker(shop.app, "open").start()
    # Left running on purpose: the fixture stops it.


def test_an_open_breaker_fails_tasks_at_the_worker_unless_bulkheads_are_off(shop: Shop) -> None:
    failing = shop.tasks["failing"]
    trip_breaker(shop.app, "failing")
    with pool_worker(shop.app, "failing"):
        with pytest.raises(CircuitOpen):
            failing.delay().get(timeout=10)
        with bulkheads_disabled(shop.app):
            assert failing.delay().get(timeout=10) == "failing ran"
    reset_breaker(shop.app, "failing")


# -- the plugin itself ------------------------------------------------------------------------


_IMPORT_PLUGIN = """
import socket, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.startswith(("celery_bulkhead.worker", "celery.worker", "redis")) or name in (
            "celery.contrib.testing.worker", "celery_bulkhead.tenants.redis",
        ):
            raise ImportError("blocked: " + name)

sys.meta_path.insert(0, Block())
def connect(*args):
    raise AssertionError("connected")
socket.socket.connect = connect
import celery_bulkhead.testing
print("ok")
"""


def test_importing_the_plugin_loads_no_worker_side_no_redis_and_connects_nowhere() -> None:
    """What every pytest run with the package installed pays: the producer side, nothing more."""
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_PLUGIN], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "ok\n"


def test_fill_pool_is_exact_under_concurrent_fillers(shop: Shop) -> None:
    counts: list[int] = []
    threads = [
        threading.Thread(target=lambda: counts.append(fill_pool(shop.app, "capped")))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(counts) == [0, 0, 0, 3] or sum(counts) == 3
    assert drain(shop.app, "capped") == 3
