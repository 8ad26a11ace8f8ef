"""Admitted work is never lost to a cap: callbacks, errbacks, canvas steps; drops in canvas.

Each worker test fills the ``retrier`` pool (cap 2, one thread) while a task
of that pool is running, proves the queue really is full, then lets the task
finish: what it must publish next (a callback, an errback, a group, a chord's
body) still runs, through the pool's uncapped continuation queue.
"""

from __future__ import annotations

import time

import pytest
from celery import chain, chord, group

from celery_bulkhead import PoolFull
from tests.conftest import Env


def _fill_until_full(env: Env) -> None:
    """Publish new work until the retrier pool refuses it (at most its cap, 2)."""
    fill = env.app.tasks["capped.fill"]
    for i in range(3):
        try:
            fill.delay(f"fill-{i}")
        except PoolFull:
            return
    pytest.fail("the retrier pool (cap 2) never refused new work")


def _continued(env: Env, tag: str) -> None:
    (done,) = env.records.wait("done", tag, timeout=60)
    assert done["routing_key"] == f"{env.prefix}.retrier.continue"


def test_a_link_callback_is_never_refused(capped: Env) -> None:
    """``apply_async(link=sig)``: Celery gives the callback no id; it still passes the cap."""
    capped.start("--pool", "retrier")
    release = capped.key("release")
    step, fill = capped.app.tasks["capped.step"], capped.app.tasks["capped.fill"]
    step.apply_async((None, "parent", release), link=fill.si("callback"))
    capped.records.wait("started", "parent", timeout=60)
    _fill_until_full(capped)
    capped.release(release)
    _continued(capped, "callback")


def test_an_errback_is_never_refused(capped: Env) -> None:
    capped.start("--pool", "retrier")
    release = capped.key("release")
    fail_after, fill = capped.app.tasks["capped.fail_after"], capped.app.tasks["capped.fill"]
    fail_after.apply_async(("failing", release), link_error=fill.si("errback"))
    capped.records.wait("started", "failing", timeout=60)
    _fill_until_full(capped)
    capped.release(release)
    _continued(capped, "errback")


def test_every_member_of_a_group_that_is_the_next_chain_step_runs(capped: Env) -> None:
    capped.start("--pool", "retrier")
    release = capped.key("release")
    step, fill = capped.app.tasks["capped.step"], capped.app.tasks["capped.fill"]
    chain(
        step.s(None, "first", release), group(fill.si("member-1"), fill.si("member-2"))
    ).apply_async()
    capped.records.wait("started", "first", timeout=60)
    _fill_until_full(capped)
    capped.release(release)
    _continued(capped, "member-1")
    _continued(capped, "member-2")


def test_a_chords_body_is_never_refused(capped: Env) -> None:
    capped.start("--pool", "retrier")
    release = capped.key("release")
    step, fill = capped.app.tasks["capped.step"], capped.app.tasks["capped.fill"]
    chord([step.s(None, "header", release)], fill.si("body")).apply_async()
    capped.records.wait("started", "header", timeout=60)
    _fill_until_full(capped)
    capped.release(release)
    _continued(capped, "body")


def _raises_pool_full_at_once(result: object) -> PoolFull:
    started = time.monotonic()
    with pytest.raises(PoolFull) as info:
        result.get(timeout=30)  # type: ignore[attr-defined]
    assert time.monotonic() - started < 5  # from the backend, not a wait for a timeout
    return info.value


def test_dropped_group_members_results_fail_with_pool_full(capped: Env) -> None:
    """A group's results are built before it publishes: a dropped member's says so."""
    drop_me = capped.app.signature("capped.drop_me")
    result = group(drop_me.clone(args=(i,)) for i in range(5)).apply_async()
    assert capped.ready_messages(f"{capped.prefix}.dropper") == 3
    for dropped in result.results[3:]:
        error = _raises_pool_full_at_once(dropped)
        assert (error.pool, error.cap) == ("dropper", 3)
        assert dropped.failed() and dropped.state == "FAILURE"
    for admitted in result.results[:3]:
        assert admitted.state == "PENDING"  # queued, waiting for a worker


def test_a_chain_whose_first_step_is_dropped_fails_fast(capped: Env) -> None:
    drop_me = capped.app.tasks["capped.drop_me"]
    for i in range(3):
        drop_me.delay(i)
    result = chain(drop_me.s(10), drop_me.si(11), drop_me.si(12)).apply_async()
    error = _raises_pool_full_at_once(result)  # the last step's result
    assert error.pool == "dropper"
    _raises_pool_full_at_once(result.parent)
    assert capped.ready_messages(f"{capped.prefix}.dropper") == 3
