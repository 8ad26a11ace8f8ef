"""The result of a publish that was dropped because the pool was full."""

from __future__ import annotations

from typing import Any, Literal

from celery.result import AsyncResult

from .errors import PoolFull

__all__ = ["DroppedResult"]


class DroppedResult(AsyncResult):  # type: ignore[type-arg]
    """Returned instead of an ``AsyncResult`` when ``on_full="drop"`` dropped a task.

    ``.dropped`` is true and ``.error`` is the :class:`PoolFull` that caused
    the drop.  The task will never run: ``.get()`` raises that error at once
    instead of waiting forever; ``.ready()`` and ``.failed()`` are true and
    ``.state`` is ``"FAILURE"``, without asking the result backend.
    """

    dropped = True

    def __init__(self, id: str, error: PoolFull, app: Any = None) -> None:
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
