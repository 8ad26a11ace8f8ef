"""Pure admission logic: what bypasses a cap, drop logging, the dropped result."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery

from celery_bulkhead import DroppedResult, PoolFull
from celery_bulkhead.admission import bypass_reason
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
