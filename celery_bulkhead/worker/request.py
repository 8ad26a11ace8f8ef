"""The Request class of a pool's tasks: main-process callbacks feeding listeners.

Celery calls a request's ``on_accepted``, ``on_success`` and ``on_failure``
in the worker's *main* process whatever the execution pool (prefork children
report back to it), so whatever is counted or released there is exact under
prefork.  :class:`BulkheadRequest` turns those callbacks into two events for
its listeners: :meth:`Listener.started` and :meth:`Listener.finished` with an
outcome.  A failing listener is logged and never breaks the task.

Outcomes: ``succeeded``, ``failed``, ``retried`` (``self.retry``,
``autoretry_for``), ``timed_out`` (hard or unhandled soft time limit),
``rejected`` (``Reject``), ``ignored`` (``Ignore``), ``revoked`` (terminated
while running).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from billiard.einfo import ExceptionWithTraceback  # type: ignore[attr-defined]  # not in stubs
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded, TimeLimitExceeded
from celery.worker.request import Request

__all__ = ["OUTCOMES", "BulkheadRequest", "Gate", "Listener", "outcome_of", "request_class"]

logger = logging.getLogger(__name__)

OUTCOMES = ("succeeded", "failed", "retried", "timed_out", "rejected", "ignored", "revoked")


class Gate(Protocol):
    """Decides, just before a task starts, whether it runs now (tenant limits)."""

    def admit(self, request: Any) -> bool: ...

    def skipped(self, request: Any) -> None: ...

    def release(self, request: Any) -> None: ...


class Listener(Protocol):
    """Told when a pool task starts and finishes, in the worker's main process."""

    def started(self, request: Request) -> None: ...

    def finished(
        self, request: Request, outcome: str, runtime: float | None, was_started: bool
    ) -> None: ...


def outcome_of(exc: BaseException | None) -> str:
    """The outcome a task that ended with ``exc`` is counted under."""
    if isinstance(exc, ExceptionWithTraceback):  # how prefork children send exceptions
        exc = exc.exc
    if isinstance(exc, Retry):
        return "retried"
    if isinstance(exc, Reject):
        return "rejected"
    if isinstance(exc, Ignore):
        return "ignored"
    if isinstance(exc, (TimeLimitExceeded, SoftTimeLimitExceeded)):
        return "timed_out"
    if type(exc).__name__ == "Terminated":  # billiard's, raised for revoke(terminate=True)
        return "revoked"
    return "failed"


class BulkheadRequest(Request):
    """A pool task's request: tells :attr:`listeners` when it starts and how it ends."""

    listeners: Sequence[Listener] = ()
    #: Checked just before the task is handed to the execution pool (tenant limits).
    gate: Gate | None = None
    bulkhead_tenant: str | None = None
    bulkhead_trial: str | None = None
    bulkhead_spent = False
    bulkhead_exc: BaseException | None = None
    _bulkhead_started: float | None = None
    _bulkhead_done = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Celery derives a class from this one per task (create_request_cls)
        # whose on_success and execute_using_pool never call their base's; the
        # execution pool calls back ``self.on_success`` and the consumer calls
        # ``self.execute_using_pool``, which instance attributes answer first.
        self.on_success = self._on_success  # type: ignore[method-assign]  # see above
        if self.gate is not None:
            self.execute_using_pool = self._gated_execute  # type: ignore[method-assign]

    def _gated_execute(self, pool: Any, **kwargs: Any) -> Any:
        gate = self.gate
        assert gate is not None
        if not gate.admit(self):
            gate.skipped(self)  # deferred (published again) or failed fast, and acknowledged
            return None
        try:
            return type(self).execute_using_pool(self, pool, **kwargs)
        except BaseException:
            gate.release(self)  # revoked before it started, or the pool refused it
            raise

    def _finish(self, outcome: str, runtime: float | None) -> None:
        if self._bulkhead_done:
            return
        self._bulkhead_done = True
        started = self._bulkhead_started
        if runtime is None and started is not None:
            runtime = time.monotonic() - started
        for listener in self.listeners:
            try:
                listener.finished(self, outcome, runtime, started is not None)
            except Exception:
                logger.exception("celery-bulkhead: listener %r failed", listener)

    def on_accepted(self, pid: Any, time_accepted: float) -> None:
        if self._bulkhead_started is None:
            self._bulkhead_started = time.monotonic()
            for listener in self.listeners:
                try:
                    listener.started(self)
                except Exception:
                    logger.exception("celery-bulkhead: listener %r failed", listener)
        super().on_accepted(pid, time_accepted)

    def _on_success(self, failed__retval__runtime: Any, **kwargs: Any) -> Any:
        failed, _, runtime = failed__retval__runtime
        if not failed:
            self._finish("succeeded", runtime)
        # A failure goes on to self.on_failure, below.
        return type(self).on_success(self, failed__retval__runtime, **kwargs)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = getattr(exc_info, "exception", None)
        self.bulkhead_exc = exc  # for listeners that judge the exception (a breaker)
        self._finish(outcome_of(exc), None)
        return super().on_failure(
            exc_info, send_failed_event=send_failed_event, return_ok=return_ok
        )


def request_class(
    pool: str, listeners: Sequence[Listener], gate: Gate | None = None
) -> type[BulkheadRequest]:
    """The Request class for one pool's tasks on this node."""
    return type(
        f"BulkheadRequest_{pool}",
        (BulkheadRequest,),
        {"listeners": tuple(listeners), "gate": gate},
    )
