"""Pure admission logic: what bypasses a cap, drop logging, the dropped result."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery

from celery_bulkhead import DroppedResult, Pool, PoolFull
from celery_bulkhead.caps.amqp import mismatch_error
from celery_bulkhead.followups import (
    bypass_reason,
    mark_follow_ups,
    signature_ids,
)
from celery_bulkhead.message import FOLLOW_UP as FOLLOW_UP_HEADER
from celery_bulkhead.metrics import DropLog


class FakeApp:
    """Only what bypass_reason reads: the task the worker is running now."""

    def __init__(self, request: Any = None) -> None:
        self.current_worker_task = SimpleNamespace(request=request) if request else None


def request(**fields: Any) -> SimpleNamespace:
    base: dict[str, Any] = {
        "id": "running",
        "chain": None,
        "callbacks": None,
        "errbacks": None,
        "chord": None,
    }
    return SimpleNamespace(**{**base, **fields})


def sig(task_id: str) -> dict[str, Any]:
    return {"task": "t", "options": {"task_id": task_id}}


def test_a_retry_bypasses_the_cap() -> None:
    assert bypass_reason(FakeApp(), {"id": "x", "retries": 1}) == "retry"  # type: ignore[arg-type]
    # Task.retry re-sends the running task's own id.
    app = FakeApp(request(id="running"))
    assert bypass_reason(app, {"id": "running", "retries": 0}) == "retry"  # type: ignore[arg-type]


def test_the_next_chain_step_callbacks_and_chord_body_bypass_the_cap() -> None:
    running = request(
        chain=[sig("step-3"), sig("step-2")],
        callbacks=[sig("cb")],
        errbacks=[sig("eb")],
        chord=sig("body"),
    )
    app = FakeApp(running)
    for follow_up in ("step-2", "cb", "eb", "body"):
        assert bypass_reason(app, {"id": follow_up}) == "continuation"  # type: ignore[arg-type]
    # Only the *next* chain step is published now; a later one is not a follow-up yet.
    assert bypass_reason(app, {"id": "step-3"}) is None  # type: ignore[arg-type]


def test_new_work_from_producers_or_inside_tasks_is_admitted_normally() -> None:
    assert bypass_reason(FakeApp(), {"id": "new", "retries": 0}) is None  # type: ignore[arg-type]
    app = FakeApp(request(chain=[sig("next")]))
    assert bypass_reason(app, {"id": "child-task"}) is None  # type: ignore[arg-type]


def test_drop_log_is_rate_limited_and_reports_the_count(caplog: pytest.LogCaptureFixture) -> None:
    log = DropLog(interval=3600)
    with caplog.at_level(logging.WARNING, logger="celery_bulkhead.admission"):
        for _ in range(5):
            log.dropped("webhooks", 10, 10)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "celery-bulkhead: pool 'webhooks' is full (10 ready, cap 10): dropped 1 task(s) "
        "since the last report"
    ]
    log.interval = 0
    with caplog.at_level(logging.WARNING, logger="celery_bulkhead.admission"):
        log.dropped("webhooks", 10, 10)
    assert "dropped 5 task(s)" in caplog.records[-1].getMessage()


def test_dropped_result_never_asks_the_backend() -> None:
    app = Celery("dropped", broker="memory://", set_as_current=False)
    error = PoolFull("webhooks", 5, 5, task_id="abc")
    result = DroppedResult("abc", error, app=app)
    assert result.dropped and result.ready() and result.failed() and not result.successful()
    assert result.state == "FAILURE"
    with pytest.raises(PoolFull) as info:
        result.get()
    assert info.value is error
    assert repr(result) == "<DroppedResult: abc pool='webhooks'>"


def test_members_of_a_group_that_is_the_next_chain_step_bypass_the_cap() -> None:
    next_step = {
        "task": "celery.group",
        "options": {},
        "kwargs": {"tasks": [sig("member-1"), sig("member-2")]},
    }
    app = FakeApp(request(chain=[sig("after-the-group"), next_step]))
    for member in ("member-1", "member-2"):
        assert bypass_reason(app, {"id": member}) == "continuation"  # type: ignore[arg-type]
    assert bypass_reason(app, {"id": "after-the-group"}) is None  # type: ignore[arg-type]


def test_tasks_nested_in_callback_chains_and_chords_are_follow_ups() -> None:
    chord_sig = {
        "task": "celery.chord",
        "kwargs": {
            "header": {"task": "celery.group", "kwargs": {"tasks": [sig("h1"), sig("h2")]}},
            "body": sig("body"),
        },
    }
    chain_sig = {"task": "celery.chain", "kwargs": {"tasks": [sig("c1"), sig("c2")]}}
    assert signature_ids([chord_sig, chain_sig, "not a signature"]) == {
        "h1",
        "h2",
        "body",
        "c1",
        "c2",
    }


def test_everything_chord_unlock_publishes_is_the_chords_body() -> None:
    app = FakeApp(request(task="celery.chord_unlock"))
    assert bypass_reason(app, {"id": "body-published-late"}) == "continuation"  # type: ignore[arg-type]


def test_chord_unlock_itself_stands_for_the_chords_body_wherever_it_is_published() -> None:
    """Backends without native chords publish it at submit time, to the body's queue."""
    unlock = {"id": "unlock", "task": "celery.chord_unlock", "retries": 0}
    assert bypass_reason(FakeApp(), unlock, in_worker=False) == "continuation"  # type: ignore[arg-type]
    in_a_task = FakeApp(request(task="capped.step"))  # a chord applied by a running task
    assert bypass_reason(in_a_task, unlock) == "continuation"  # type: ignore[arg-type]
    # It carries the body's headers= option, whose marker names the body, not it.
    body_headers = {FOLLOW_UP_HEADER: "body", "trace": "t-1"}
    assert bypass_reason(FakeApp(), unlock, False, body_headers) == "continuation"  # type: ignore[arg-type]


def test_other_celery_builtins_are_new_work() -> None:
    for name in ("celery.chord", "celery.group", "celery.chain", "celery.map"):
        message = {"id": "x", "task": name, "retries": 0}
        assert bypass_reason(FakeApp(), message, in_worker=False) is None  # type: ignore[arg-type]


def _message(embed: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], Any, None]:
    return ({"id": "parent"}, {}, ((), {}, embed), None)


def _marker(sig: Any) -> Any:
    return ((sig.get("options") or {}).get("headers") or {}).get(FOLLOW_UP_HEADER)


def _marked(sig: Any) -> bool:
    """Marked with its own id, the one it will be published with."""
    task_id = (sig.get("options") or {}).get("task_id")
    return bool(task_id) and _marker(sig) == task_id


def test_every_follow_up_a_message_carries_is_marked_without_touching_the_callers() -> None:
    app = Celery("mark", broker="memory://", set_as_current=False)
    callback = app.signature("cb", args=(1,), options={"headers": {"user": "kept"}})
    group_callback = app.signature("celery.group", kwargs={"tasks": [app.signature("member")]})
    errback = app.signature("eb", options={"link_error": [app.signature("eb-of-eb")]})
    chord_body = app.signature("body", options={"link_error": [app.signature("chord-eb")]})
    chain_step = app.signature("step-2", options={"task_id": "frozen-by-celery"})
    message = _message(
        {
            "callbacks": [callback, group_callback],
            "errbacks": [errback],
            "chain": [chain_step],
            "chord": chord_body,
        }
    )
    mark_follow_ups(message)
    embed = message[2][2]
    (marked_cb, marked_group) = embed["callbacks"]
    assert _marked(marked_cb) and marked_cb["options"]["headers"]["user"] == "kept"
    assert marked_cb["args"] == (1,)
    # A group without headers of its own leaves its members' headers alone.
    assert _marker(marked_group) is None and _marked(marked_group["kwargs"]["tasks"][0])
    assert _marked(embed["errbacks"][0]) and _marked(
        embed["errbacks"][0]["options"]["link_error"][0]
    )
    assert (
        _marked(embed["chain"][0]) and embed["chain"][0]["options"]["task_id"] == "frozen-by-celery"
    )
    assert _marked(embed["chord"]) and _marked(embed["chord"]["options"]["link_error"][0])
    # The caller's signatures are unchanged.
    assert callback.options == {"headers": {"user": "kept"}}
    assert group_callback["kwargs"]["tasks"][0]["options"] == {}
    assert chain_step.options == {"task_id": "frozen-by-celery"}
    assert chord_body["options"]["link_error"][0]["options"] == {}


def test_a_container_with_headers_of_its_own_names_all_its_tasks() -> None:
    """Celery gives a chain's, group's or chord's headers to its members in place of theirs."""
    app = Celery("mark", broker="memory://", set_as_current=False)
    errback_chain = app.signature(
        "celery.chain",
        kwargs={"tasks": [app.signature("c1"), app.signature("c2")]},
        options={"headers": {"trace": "t-1"}},
    )
    message = _message({"errbacks": [errback_chain]})
    mark_follow_ups(message)
    (marked,) = message[2][2]["errbacks"]
    steps = marked["kwargs"]["tasks"]
    assert marked["options"]["headers"]["trace"] == "t-1"
    assert sorted(_marker(marked)) == sorted(s["options"]["task_id"] for s in steps)
    # The first step, published with the chain's headers, passes; new work does not.
    first = steps[0]["options"]["task_id"]
    chain_headers = marked["options"]["headers"]
    assert bypass_reason(FakeApp(), {"id": first}, True, chain_headers) == "continuation"  # type: ignore[arg-type]
    assert bypass_reason(FakeApp(), {"id": "new"}, True, chain_headers) is None  # type: ignore[arg-type]


def test_an_already_marked_step_is_not_copied_again() -> None:
    step = {"task": "t", "options": {"task_id": "s1", "headers": {FOLLOW_UP_HEADER: "s1"}}}
    message = _message({"chain": [step]})
    mark_follow_ups(message)
    assert message[2][2]["chain"][0] is step


def test_a_marked_publish_is_a_continuation_wherever_it_is_made() -> None:
    """The worker's main process (no task running) publishes errbacks after a hard time limit."""
    no_task = FakeApp()
    assert bypass_reason(no_task, {"id": "eb"}, True, {FOLLOW_UP_HEADER: "eb"}) == "continuation"  # type: ignore[arg-type]
    assert bypass_reason(no_task, {"id": "eb", FOLLOW_UP_HEADER: "eb"}) == "continuation"  # type: ignore[arg-type]


def test_a_follow_ups_headers_forwarded_to_new_work_do_not_pass_the_cap() -> None:
    """``child.apply_async(headers=self.request.headers)`` in a follow-up is new work."""
    forwarded = {FOLLOW_UP_HEADER: "the-follow-up", "trace": "t-1"}
    for in_worker in (True, False):
        assert bypass_reason(FakeApp(), {"id": "child"}, in_worker, forwarded) is None  # type: ignore[arg-type]
    assert bypass_reason(FakeApp(), {"id": "child", **forwarded}) is None  # type: ignore[arg-type]


def test_odd_embed_entries_are_left_as_they_are() -> None:
    odd = [
        {"task": "celery.group", "kwargs": ["not", "a", "mapping"]},
        {"task": "t", "options": ["x"]},
        "a string",
        None,
    ]
    message = _message({"callbacks": odd, "errbacks": ({"task": "t", "options": None},)})
    mark_follow_ups(message)
    assert message[2][2]["callbacks"] == odd
    assert _marked(message[2][2]["errbacks"][0])


def test_a_message_without_follow_ups_is_left_alone() -> None:
    embed: dict[str, Any] = {"callbacks": None, "errbacks": None, "chain": None}
    message = _message(embed)
    mark_follow_ups(message)
    assert message[2][2] == {"callbacks": None, "errbacks": None, "chain": None}
    legacy = ({"id": "x"}, {}, {"task": "protocol 1 body"}, None)
    mark_follow_ups(legacy)  # not protocol 2: nothing to do, no error
    assert legacy[2] == {"task": "protocol 1 body"}


@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_pool_full_stored_as_a_task_failure_comes_back_as_pool_full(serializer: str) -> None:
    """A PoolFull raised in a task (or stored for a drop) survives the result backend."""
    app = Celery("roundtrip", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.result_serializer = serializer
    app.conf.result_accept_content = [serializer]
    error = PoolFull("webhooks", 7, 7, task_id="t1", group_id="g1", admitted=("a",))
    stored = app.backend.prepare_exception(error)
    back = app.backend.exception_to_python(app.backend.decode(app.backend.encode(stored)))
    assert isinstance(back, PoolFull)
    assert (back.pool, back.depth, back.cap) == ("webhooks", 7, 7)
    assert str(back).startswith("pool 'webhooks' is full: 7 ready messages, cap 7")


@pytest.mark.parametrize(
    ("text", "current"),
    [
        (
            "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q.small' in "
            "vhost '/': received the value '2' of type 'signedint' but current is the value "
            "'50' of type 'signedint'",
            "50",
        ),
        (
            "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q.small' in "
            "vhost '/': received the value '2' of type 'signedint' but current is none",
            "(not set)",
        ),
    ],
)
def test_rabbitmq_argument_mismatch_names_queue_argument_and_both_values(
    text: str, current: str
) -> None:
    pool = Pool("small", max_queue=2, queue="q.small")
    error = mismatch_error(pool, Exception(text))
    assert error is not None and (error.pool, error.setting) == ("small", "max_queue")
    assert (
        f"queue 'q.small' already exists with x-max-length={current}; "
        "this app declares x-max-length=2" in str(error)
    )
