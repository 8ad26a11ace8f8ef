"""What a dropped publish leaves behind: a result that says so.

A plain ``delay()``/``apply_async()`` returns a :class:`DroppedResult`.  A
canvas (group, chain) has handed out its results before it publishes, so a
dropped member's or step's own result cannot be swapped: the drop is written
to the result backend instead, as that task's ``FAILURE`` with the
:class:`PoolFull` error, so that waiting on it raises at once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from celery import states
from celery.backends.base import DisabledBackend
from celery.result import AsyncResult

from . import message
from .errors import Rejected
from .followups import signature_ids

__all__ = ["DroppedResult", "fail_canvas_results"]

logger = logging.getLogger("celery_bulkhead.admission")


class DroppedResult(AsyncResult):  # type: ignore[type-arg]
    """Returned instead of an ``AsyncResult`` when ``on_full="drop"`` dropped a task.

    ``.dropped`` is true and ``.error`` is the :class:`PoolFull` (or
    :class:`TenantLimited`) that caused the drop.  The task will never run:
    ``.get()`` raises that error at once instead of waiting forever;
    ``.ready()`` and ``.failed()`` are true and ``.state`` is ``"FAILURE"``,
    without asking the result backend.
    """

    dropped = True

    def __init__(self, id: str, error: Rejected, app: Any = None) -> None:
        super().__init__(id, app=app)
        self.error = error

    def get(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error

    wait = get

    def ready(self) -> bool:
        return True

    def successful(self) -> bool:
        return False

    def failed(self) -> bool:
        return True

    # Never asks the result backend: the task was never sent.
    @property
    def state(self) -> Literal["FAILURE"]:
        return "FAILURE"

    status = state

    def __repr__(self) -> str:
        return f"<DroppedResult: {self.id} pool={self.error.pool!r}>"


def _canvas_ids(headers: Mapping[str, Any], task_message: Any) -> list[str]:
    """Ids of results a canvas already handed out for a dropped message."""
    steps = (message.embed(task_message) or {}).get("chain")
    if not steps and not headers.get("group"):
        return []  # a plain publish: its DroppedResult says it all
    # The rest of a chain never runs either: every task in it, group members too.
    return [headers["id"], *sorted(signature_ids(steps))]


def fail_canvas_results(
    app: Any, headers: Mapping[str, Any], task_message: Any, error: Rejected
) -> None:
    """Store ``error`` as the FAILURE of the results a canvas handed out for a dropped task.

    Does nothing for a plain publish, without a result backend, or when the
    backend cannot be reached (logged: a drop must not turn into an error).
    """
    ids = _canvas_ids(headers, task_message)
    if not ids:
        return
    try:
        backend = app.backend
        if isinstance(backend, DisabledBackend):
            return
        for task_id in ids:
            backend.store_result(task_id, error, states.FAILURE)
    except Exception:
        logger.exception("celery-bulkhead: could not record the drop of %s in the backend", ids)
