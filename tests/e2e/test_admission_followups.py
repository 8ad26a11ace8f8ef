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

from celery_bulkhead import PoolFull, admission
from tests.e2e.conftest import Env, wait_for


def _fill_until_full(env: Env) -> None:
    """Publish new work until the retrier pool refuses it (at most its cap, 2)."""
    fill = env.app.tasks["capped.fill"]
    for i in range(3):
        try:
            fill.delay(f"fill-{i}")
        except PoolFull:
            return
    pytest.fail("the retrier pool (cap 2) never refused new work")


def _fill_while_running(env: Env, tag: str, release: str) -> None:
    """Once the task tagged ``tag`` runs, fill its pool until refused, then let the task go on."""
    env.records.wait("started", tag, timeout=60)
    _fill_until_full(env)
    env.release(release)


def _continued(env: Env, tag: str) -> None:
    (done,) = env.records.wait("done", tag, timeout=60)
    assert done["routing_key"] == f"{env.prefix}.retrier.continue"


def test_a_link_callback_is_never_refused(capped: Env) -> None:
    """``apply_async(link=sig)``: Celery gives the callback no id; it still passes the cap."""
    capped.start("--pool", "retrier")
    release = capped.key("release")
    step, fill = capped.app.tasks["capped.step"], capped.app.tasks["capped.fill"]
    step.apply_async((None, "parent", release), link=fill.si("callback"))
    _fill_while_running(capped, "parent", release)
    _continued(capped, "callback")


def test_an_errback_is_never_refused(capped: Env) -> None:
    capped.start("--pool", "retrier")
    release = capped.key("release")
    fail_after, fill = capped.app.tasks["capped.fail_after"], capped.app.tasks["capped.fill"]
    fail_after.apply_async(("failing", release), link_error=fill.si("errback"))
    _fill_while_running(capped, "failing", release)
    _continued(capped, "errback")


def test_every_member_of_a_group_that_is_the_next_chain_step_runs(capped: Env) -> None:
    capped.start("--pool", "retrier")
    release = capped.key("release")
    step, fill = capped.app.tasks["capped.step"], capped.app.tasks["capped.fill"]
    chain(
        step.s(None, "first", release), group(fill.si("member-1"), fill.si("member-2"))
    ).apply_async()
    _fill_while_running(capped, "first", release)
    _continued(capped, "member-1")
    _continued(capped, "member-2")


def test_a_chords_body_is_never_refused(capped: Env) -> None:
    capped.start("--pool", "retrier")
    release = capped.key("release")
    step, fill = capped.app.tasks["capped.step"], capped.app.tasks["capped.fill"]
    chord([step.s(None, "header", release)], fill.si("body")).apply_async()
    _fill_while_running(capped, "header", release)
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


@pytest.mark.parametrize("errback_kind", ["task", "chain-with-headers"])
def test_an_errback_published_by_the_workers_main_process_is_never_refused(
    capped: Env, errback_kind: str
) -> None:
    """A hard time limit kills the task: the main process (no task running) sends its errback.

    An errback chain with headers of its own is the hard case: Celery gives the
    chain's headers to its first task in place of the task's own.
    """
    worker = capped.start("--pool", "limited")
    release = capped.key("release")
    hang, fill = capped.app.tasks["capped.hang"], capped.app.tasks["capped.fill"]
    errback = fill.si("errback-after-timeout")
    if errback_kind == "chain-with-headers":
        errback = chain(errback, fill.si("second-step")).set(headers={"trace": "t-1"})
    hang.apply_async(("hung", release), link_error=errback)
    capped.records.wait("started", "hung", timeout=60)
    _fill_until_full(capped)  # nothing consumes the retrier pool in this test
    continued = f"{capped.prefix}.retrier.continue"
    # Celery itself may send the errback twice here (for the time limit, then for the
    # killed child); what matters is that it is sent, past the full pool.
    wait_for(lambda: capped.ready_messages(continued) >= 1, 30, "the errback in .continue")
    assert capped.ready_messages(f"{capped.prefix}.retrier") == 2  # the cap still holds
    assert "PoolFull" not in worker.log()
    capped.release(release)


def test_a_chords_errback_is_never_refused(capped: Env) -> None:
    capped.start("--pool", "retrier")
    release = capped.key("release")
    fail_after, fill = capped.app.tasks["capped.fail_after"], capped.app.tasks["capped.fill"]
    chord([fail_after.s("chord-part", release)], fill.si("body")).on_error(
        fill.si("chord-errback")
    ).apply_async()
    _fill_while_running(capped, "chord-part", release)
    _continued(capped, "chord-errback")
    assert not capped.records.find("done", "body")


def test_a_dropped_chain_ending_in_a_group_fails_every_members_result(capped: Env) -> None:
    drop_me = capped.app.tasks["capped.drop_me"]
    for i in range(3):
        drop_me.delay(i)
    result = chain(drop_me.s(10), group(drop_me.si(11), drop_me.si(12))).apply_async()
    for member in result.results:
        assert _raises_pool_full_at_once(member).pool == "dropper"


@pytest.mark.parametrize("worker_mode", ["celery-mark", "ids-only"])
def test_unmarked_follow_ups_are_recognised_in_the_worker(
    capped: Env, worker_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A producer without the Bulkhead marks nothing: the worker still lets the chain go on.

    With Celery >= 5.7 Celery's own mark decides; "ids-only" is what older
    Celery leaves: the ids of the chain's next step, a group's members among them.
    """
    monkeypatch.setattr(admission, "mark_follow_ups", lambda message: None)
    extra_env = {"BULKHEAD_TEST_IDS_ONLY": "1"} if worker_mode == "ids-only" else None
    capped.start("--pool", "retrier", extra_env=extra_env)
    release = capped.key("release")
    step, fill = capped.app.tasks["capped.step"], capped.app.tasks["capped.fill"]
    chain(
        step.s(None, "first", release), group(fill.si("member-1"), fill.si("member-2"))
    ).apply_async()
    _fill_while_running(capped, "first", release)
    _continued(capped, "member-1")
    _continued(capped, "member-2")
