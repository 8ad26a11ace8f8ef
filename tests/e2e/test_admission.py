"""Admission at submit time: exact caps, each on_full policy, nothing lost, on both brokers."""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import pytest
from celery import chain, group
from prometheus_client import REGISTRY

from celery_bulkhead import DroppedResult, PoolFull
from tests.app.capped import make_capped_app
from tests.e2e.conftest import Env, wait_for

PRODUCERS, ATTEMPTS_EACH, CAP = 32, 10, 100


def admissions(pool: str, decision: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "celery_bulkhead_admissions_total", {"pool": pool, "decision": decision, "reason": reason}
    )
    return value or 0.0


def _producer(url: str, prefix: str, barrier: Any, results: Any) -> None:
    app = make_capped_app(url, prefix)
    task = app.tasks["capped.noop"]
    admitted = rejected = 0
    barrier.wait(timeout=60)
    for i in range(ATTEMPTS_EACH):
        try:
            task.delay(i)
            admitted += 1
        except PoolFull as full:
            assert (full.pool, full.cap) == ("capped", CAP) and full.depth >= CAP
            rejected += 1
    results.put((admitted, rejected))


def test_cap_is_exact_under_32_concurrent_producer_processes(capped: Env) -> None:
    """32 processes race 320 publishes at a cap of 100: exactly 100 are queued, 220 refused."""
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(PRODUCERS)
    results = context.Queue()
    processes = [
        context.Process(target=_producer, args=(capped.url, capped.prefix, barrier, results))
        for _ in range(PRODUCERS)
    ]
    for process in processes:
        process.start()
    counts = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    admitted = sum(a for a, _ in counts)
    rejected = sum(r for _, r in counts)
    assert admitted == CAP
    assert rejected == PRODUCERS * ATTEMPTS_EACH - CAP
    assert capped.ready_messages(f"{capped.prefix}.capped") == CAP


def test_reject_raises_pool_full_with_the_numbers(capped: Env) -> None:
    task = capped.app.tasks["capped.small.noop"]
    before = admissions("small", "rejected", "queue_full")
    task.delay(1)
    task.apply_async(args=[2])
    with pytest.raises(PoolFull) as info:
        task.delay(3)
    error = info.value
    assert (error.pool, error.depth, error.cap) == ("small", 2, 2)
    assert str(error).startswith("pool 'small' is full: 2 ready messages, cap 2")
    with pytest.raises(PoolFull):
        capped.app.send_task("capped.small.noop", args=[4])  # by name, too
    assert admissions("small", "rejected", "queue_full") == before + 2
    assert capped.ready_messages(f"{capped.prefix}.small") == 2


def test_drop_returns_a_dropped_result_that_never_waits_and_is_counted(capped: Env) -> None:
    task = capped.app.tasks["capped.drop_me"]
    before = admissions("dropper", "dropped", "queue_full")
    kept = [task.delay(i) for i in range(3)]
    assert [r.dropped for r in kept] == [False, False, False]
    result = task.delay(99)
    assert isinstance(result, DroppedResult) and result.dropped
    assert result.ready() and result.failed()
    started = time.monotonic()
    with pytest.raises(PoolFull, match="pool 'dropper' is full: 3 ready messages, cap 3"):
        result.get(timeout=30)
    assert time.monotonic() - started < 1  # raises at once, never waits
    assert admissions("dropper", "dropped", "queue_full") == before + 1
    assert capped.ready_messages(f"{capped.prefix}.dropper") == 3


def test_block_waits_for_room_then_publishes(capped: Env) -> None:
    task = capped.app.tasks["capped.block_me"]
    queue = f"{capped.prefix}.blocker"
    task.delay(1)
    task.delay(2)
    consumer = threading.Timer(0.3, capped.take, args=(queue,))
    started = time.monotonic()
    consumer.start()
    task.delay(3)  # waits until the consumer makes room
    waited = time.monotonic() - started
    consumer.join()
    assert 0.25 <= waited < 1.0
    assert capped.ready_messages(queue) == 2


def test_block_rejects_after_block_timeout(capped: Env) -> None:
    task = capped.app.tasks["capped.block_me"]
    before = admissions("blocker", "rejected", "block_timeout")
    task.delay(1)
    task.delay(2)
    started = time.monotonic()
    with pytest.raises(PoolFull, match=r"no room within") as info:
        task.delay(3)
    waited = time.monotonic() - started
    assert 0.9 <= waited < 3.0  # block_timeout is 1 s; generous upper margin
    assert info.value.waited >= 0.9
    assert admissions("blocker", "rejected", "block_timeout") == before + 1


def test_chain_first_step_and_group_members_are_admitted_like_any_publish(capped: Env) -> None:
    sig = capped.app.signature("capped.small.noop")
    group([sig.clone(args=(1,)), sig.clone(args=(2,))]).apply_async()
    with pytest.raises(PoolFull):
        chain(sig.clone(args=(3,)), sig.clone(args=(4,))).apply_async()
    capped.take(f"{capped.prefix}.small")
    capped.take(f"{capped.prefix}.small")
    with pytest.raises(PoolFull) as info:
        group([sig.clone(args=(i,)) for i in range(3)]).apply_async()
    error = info.value
    assert error.group_id is not None
    assert len(error.admitted) == 2  # the members already published are named, not hidden
    assert f"group {error.group_id} refused at task {error.task_id}" in str(error)


def test_a_tasks_own_retry_is_never_refused(capped: Env) -> None:
    """The pool's queue is full when the running task retries: the retry still runs."""
    capped.start("--pool", "retrier")
    app = capped.app
    release = capped.key("release")
    app.tasks["capped.flaky"].delay("retry-me", release)
    capped.records.wait("started", "retry-me", timeout=60)
    app.tasks["capped.fill"].delay("fill-1")
    app.tasks["capped.fill"].delay("fill-2")
    with pytest.raises(PoolFull):  # the queue really is full
        app.tasks["capped.fill"].delay("fill-3")
    capped.release(release)
    runs = capped.records.wait("started", "retry-me", count=2, timeout=60)
    assert [r["retries"] for r in runs] == [0, 1]
    # Queue wait is measured from the retry's own publish, not the first one.
    assert runs[1]["published_at"] > runs[0]["published_at"]
    (done,) = capped.records.wait("done", "retry-me", timeout=60)
    assert done["routing_key"] == f"{capped.prefix}.retrier.continue"
    capped.records.wait("done", "fill-1")
    capped.records.wait("done", "fill-2")


def test_later_steps_of_an_admitted_chain_are_never_refused(capped: Env) -> None:
    capped.start("--pool", "retrier")
    app = capped.app
    release = capped.key("release")
    step = app.signature("capped.step")
    chain(step.clone(args=(None, "first", release)), step.clone(args=("second",))).apply_async()
    capped.records.wait("started", "first", timeout=60)
    app.tasks["capped.fill"].delay("fill-1")
    app.tasks["capped.fill"].delay("fill-2")
    with pytest.raises(PoolFull):
        app.tasks["capped.fill"].delay("fill-3")
    capped.release(release)
    (second,) = capped.records.wait("done", "second", timeout=60)
    assert second["previous"] == "first"
    assert second["routing_key"] == f"{capped.prefix}.retrier.continue"


def test_eager_mode_bypasses_admission() -> None:
    app = make_capped_app("memory://", "eager", task_always_eager=True)
    results = [app.tasks["capped.small.noop"].delay(i) for i in range(5)]
    assert all(r.successful() for r in results)


def test_time_to_wait_for_room_is_not_spent_spinning(capped: Env) -> None:
    """A blocked publish polls with a growing pause: a handful of attempts, not thousands."""
    task = capped.app.tasks["capped.block_me"]
    task.delay(1)
    task.delay(2)
    before = threading.active_count()
    cpu_before = time.process_time()
    with pytest.raises(PoolFull):
        task.delay(3)
    assert time.process_time() - cpu_before < 0.5  # of ~1 s waited
    assert threading.active_count() <= before  # no thread of its own (others may end meanwhile)
    wait_for(lambda: capped.ready_messages(f"{capped.prefix}.blocker") == 2, 5, "2 messages")
