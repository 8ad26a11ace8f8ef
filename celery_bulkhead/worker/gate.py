"""Tenant limits and breakers at the worker: checked in the main process before a task starts.

**Breaker.**  A pool with a :class:`~celery_bulkhead.Breaker` asks its circuit
before each task (free while the breaker is closed: a cached state).  While
it is open the task does not run: ``on_open="defer"`` publishes it again to
the continuation queue with a countdown to the next trial time (jittered,
never lost, not a retry, not a failure); ``"fail"`` fails it with
``CircuitOpen``; ``"pause"`` stops consuming the pool's queues until the next
trial time (tasks wait in the broker) and defers the task in hand.  A
half-open trial runs as usual; how it ends (and every failure) is reported
to the circuit when the task ends, with its duration (this process's
monotonic clock, from when the gate let it through to when it ended: what
``slow_call_duration`` is compared with).

**Tenant limits.**

When a pool's :class:`~celery_bulkhead.TenantLimit` is enforced at the
worker (``enforce="worker"`` or ``"both"``, or any ``max_inflight``), a
task about to be handed to the execution pool first spends its tenant's
token and takes one of its tenant's in-flight leases.  When the tenant is
over its limit the task does not run and does not wait in the worker: it is
published again, unchanged, to the pool's continuation queue with a
countdown to its next token (plus jitter, so a fleet does not return in one
wave), and the delivery is acknowledged.  It is not a retry and not a
failure, and it is never lost: if the new publish fails, the task runs.

* A slot taken for a deferred task is reserved (its token is spent for the
  moment it is due), so a deferred task runs without a second check.
* A countdown never exceeds half the Redis transport's ``visibility_timeout``
  (a message a worker holds longer is delivered twice); a tenant whose next
  slot is further away is deferred by that much and checked again.
* After ``max_deferrals`` deferrals a task runs anyway: a bound on how long
  one task can be pushed back.
* A lease lasts the pool's ``time_limit`` plus a minute and is released when
  the task ends however it ends; a worker killed with ``kill -9`` gives its
  slots back when their leases expire.  Without a ``time_limit`` a task may
  run for ever: its lease lasts :data:`RENEWED_LEASE` (5 minutes) and the
  worker's main process renews the leases of its running tasks every third
  of that, so a long task keeps its slot and a killed worker's slots come
  back within 5 minutes.
"""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING, Any

from celery.worker.state import task_ready

from .. import message
from ..errors import CircuitOpen, ConfigurationError
from ..routing import consumed_queues

if TYPE_CHECKING:
    from celery import Celery

    from ..breaker import Circuit
    from ..pool import Pool
    from ..tenants.limiter import Limiter

__all__ = ["DEFERRALS", "RESERVED", "WorkerGate"]

logger = logging.getLogger(__name__)

#: How often a worker has pushed this task back (untrusted: only ever compared).
DEFERRALS = "bulkhead_deferrals"
#: Set on a task whose token was spent for the moment it is due.
RESERVED = "bulkhead_reserved"
#: Seconds a lease lasts in a pool without a ``time_limit``, renewed every third of it.
RENEWED_LEASE = 300.0
_BACKOFF_MIN, _BACKOFF_MAX = 0.5, 30.0


class WorkerGate:
    """The tenant checks of one pool's tasks on one worker node."""

    def __init__(
        self,
        app: Celery,
        pool: Pool,
        limiter: Limiter | None,
        metrics: Any = None,
        circuit: Circuit | None = None,
    ) -> None:
        self.app = app
        self.pool = pool
        self.limit = pool.tenant if limiter is not None and pool.tenant is not None else None
        self.limiter = limiter
        self.metrics = metrics
        self.circuit = circuit
        #: The worker (set when it starts): its consumer is paused by on_open="pause".
        self.worker: Any = None
        self._paused = False
        self.target = consumed_queues(pool)[-1]  # the continuation queue of a capped pool
        #: Leases are renewed while their tasks run when the pool has no time limit.
        time_limit = pool.time_limit
        self.renewing = time_limit is None
        self.lease_seconds = RENEWED_LEASE if time_limit is None else time_limit + 60.0
        #: The leases this node holds for running tasks: task id -> tenant.
        self._held: dict[str, str] = {}
        self._renewals: Any = None
        options = app.conf.broker_transport_options or {}
        horizon = self.limit.max_defer if self.limit is not None else 3600.0
        if str(app.conf.broker_url or "").startswith(("redis", "rediss", "sentinel")):
            horizon = min(horizon, float(options.get("visibility_timeout", 3600)) / 2)
        self.horizon = horizon

    # -- the check ---------------------------------------------------------------

    def admit(self, request: Any) -> bool:
        """True: run the task now (its lease or trial, if any, is held).  False: not now."""
        headers = request.request_dict
        deferrals = headers.get(DEFERRALS)
        deferrals = deferrals if isinstance(deferrals, int) and deferrals >= 0 else 0
        tenant = None
        if self.limit is not None:
            try:
                tenant = self.limit.tenant_of(request.args, request.kwargs, headers, request.name)
            except ConfigurationError:
                # A task the producer should have refused: run it, as Celery would.
                logger.warning(
                    "celery-bulkhead: pool %r: task %s has no valid tenant id; running it "
                    "without its tenant limit",
                    self.pool.name,
                    request.id,
                )
        request.bulkhead_spent = False
        if tenant is not None and not self._rate_ok(request, tenant, deferrals):
            return False
        if self.circuit is not None and not self._circuit_ok(request, deferrals):
            return False
        if tenant is not None and not self._lease_ok(request, tenant, deferrals):
            self._give_back_trial(request)
            return False
        return True

    def skipped(self, request: Any) -> None:
        """A task that was not handed to the execution pool gives back its pool slot.

        With prefork, the worker takes a semaphore slot before it hands a task
        to the pool, and the pool gives it back when the task ends: a task we
        did not run would hold it for ever (after ``concurrency`` deferrals the
        node would stop running anything).
        """
        worker = self.worker
        if worker is None:
            return
        process_task = getattr(worker, "process_task", None)
        if process_task is not None and process_task == getattr(worker, "_process_task_sem", None):
            worker._quick_release()

    def _rate_ok(self, request: Any, tenant: str, deferrals: int) -> bool:
        limit, limiter = self.limit, self.limiter
        assert limit is not None and limiter is not None
        headers = request.request_dict
        if (
            limit.rate is None
            or limit.enforce not in ("worker", "both")
            or headers.get(RESERVED)
            or deferrals >= limit.max_deferrals
        ):
            return True
        taken = limiter.take(self.pool, tenant, self.horizon)
        if taken is None:  # the state store did not answer in time
            return limit.on_state_error != "deny" or not self.defer(
                request, _BACKOFF_MIN * 2**deferrals, deferrals, reserved=False
            )
        if taken.allowed and not taken.wait:
            request.bulkhead_spent = True  # a later deferral keeps this token
            return True
        wait = taken.wait if taken.allowed else self.horizon
        return not self.defer(request, wait, deferrals, reserved=taken.allowed)

    def _lease_ok(self, request: Any, tenant: str, deferrals: int) -> bool:
        limit, limiter = self.limit, self.limiter
        assert limit is not None and limiter is not None
        if limit.max_inflight is None:
            return True
        over_budget = deferrals >= limit.max_deferrals
        held = limiter.lease(self.pool, tenant, request.id, self.lease_seconds)
        refused = (not held[0]) if held is not None else limit.on_state_error == "deny"
        if refused and not over_budget:
            wait = min(_BACKOFF_MIN * 2**deferrals, _BACKOFF_MAX)
            if held is not None:
                wait = min(wait, held[1])
            reserved = bool(request.request_dict.get(RESERVED)) or request.bulkhead_spent
            if self.defer(request, wait, deferrals, reserved=reserved):
                return False
        request.bulkhead_tenant = tenant  # released when the task ends
        if held is not None and held[0]:
            self._held[request.id] = tenant
            if self.renewing and self._renewals is None:
                self._start_renewals()
        return True

    def _circuit_ok(self, request: Any, deferrals: int) -> bool:
        circuit = self.circuit
        assert circuit is not None
        verdict = circuit.before()
        if verdict.run:
            request.bulkhead_trial = verdict.token
            request.bulkhead_let_through = time.monotonic()  # for the call's duration
            self._resume()
            return True
        action = circuit.breaker.on_open
        if action == "fail":
            self._fail(request, verdict.retry_after)
            return False
        if action == "pause":
            self._pause(verdict.retry_after)
        reserved = bool(request.request_dict.get(RESERVED)) or request.bulkhead_spent
        # Never lost: a task that cannot be deferred runs (and meets the open circuit).
        return not self.defer(
            request, verdict.retry_after, deferrals, reserved=reserved, reason="breaker"
        )

    def _give_back_trial(self, request: Any) -> None:
        """A trial granted to a task that then did not run: give its slot back now.

        Otherwise no other trial could run until the lease ends (a minute or more).
        """
        trial, request.bulkhead_trial = getattr(request, "bulkhead_trial", None), None
        if trial is not None and self.circuit is not None:
            self.circuit.release(trial)

    def _fail(self, request: Any, retry_after: float) -> None:
        """on_open="fail": the task fails with CircuitOpen, without running."""
        assert self.circuit is not None
        error = CircuitOpen(self.pool.name, self.circuit.name, retry_after, task_id=request.id)
        try:
            request.task.backend.mark_as_failure(
                request.id, error, request=request._context, store_result=request.store_errors
            )
        except Exception:
            logger.exception("celery-bulkhead: could not store the failure of %s", request.id)
        if self.metrics is not None:
            self.metrics.breaker_refused(self.circuit.name, "failed")
        task_ready(request)
        request.acknowledge()

    def _pause(self, retry_after: float) -> None:
        """on_open="pause": stop consuming the pool's queue until the next trial time."""
        consumer = getattr(self.worker, "consumer", None)
        if self._paused or consumer is None:
            return
        try:
            # Every queue of the pool: its continuation queue too, where the task in
            # hand is deferred to (and retries and later steps wait), so that
            # nothing bounces through the node while the breaker is open.
            for queue in consumed_queues(self.pool):
                consumer.cancel_task_queue(queue)
            self._paused = True
            consumer.timer.call_after(max(retry_after, 0.05), self._resume)
            logger.warning(
                "celery-bulkhead: pool %r: breaker open, not consuming %s for %.1fs",
                self.pool.name,
                " or ".join(map(repr, consumed_queues(self.pool))),
                retry_after,
            )
        except Exception:
            logger.exception("celery-bulkhead: pool %r: could not pause", self.pool.name)

    def _resume(self) -> None:
        consumer = getattr(self.worker, "consumer", None)
        if not self._paused or consumer is None:
            return
        try:
            for queue in consumed_queues(self.pool):
                consumer.add_task_queue(queue)
            self._paused = False
        except Exception:
            logger.exception("celery-bulkhead: pool %r: could not resume", self.pool.name)

    # -- Listener: the task ended (main process) --------------------------------------

    def started(self, request: Any) -> None:
        """Nothing to do: the lease was taken before the task started."""

    def finished(
        self, request: Any, outcome: str, runtime: float | None, was_started: bool
    ) -> None:
        if self.circuit is not None and was_started:
            exc = request.bulkhead_exc if outcome != "succeeded" else None
            let_through = getattr(request, "bulkhead_let_through", None)
            duration = runtime if let_through is None else time.monotonic() - let_through
            self.circuit.after(request.bulkhead_trial, exc, duration)
            request.bulkhead_trial = None  # reported: nothing to give back
        self.release(request)

    def release(self, request: Any) -> None:
        """Give the task's in-flight slot and any unused trial back (however it ends)."""
        self._give_back_trial(request)
        self._held.pop(request.id, None)
        tenant = getattr(request, "bulkhead_tenant", None)
        if tenant is not None and self.limit is not None and self.limiter is not None:
            request.bulkhead_tenant = None
            if self.limit.max_inflight is not None:
                self.limiter.release(self.pool, tenant, request.id)

    # -- lease renewal (pools without a time limit) ----------------------------------

    def _start_renewals(self) -> None:
        """Renew the held leases every third of their length, on the worker's timer."""
        consumer = getattr(self.worker, "consumer", None)
        timer = getattr(consumer, "timer", None) or getattr(self.worker, "timer", None)
        if timer is None:  # no worker (a unit test): leases simply last RENEWED_LEASE
            return
        self._renewals = timer.call_repeatedly(self.lease_seconds / 3, self.renew)

    def renew(self) -> None:
        """Extend the lease of every task of this node that is still running."""
        limiter = self.limiter
        if limiter is None:
            return
        for task_id, tenant in list(self._held.items()):
            try:
                held = limiter.lease(self.pool, tenant, task_id, self.lease_seconds)
            except Exception:  # a timer callback must not die: the next round tries again
                logger.exception("celery-bulkhead: pool %r: lease renewal failed", self.pool.name)
                continue
            if held is not None and not held[0] and task_id in self._held:
                logger.warning(
                    "celery-bulkhead: pool %r: task %s lost its in-flight slot (its lease "
                    "expired before it was renewed); it keeps running",
                    self.pool.name,
                    task_id,
                )

    # -- deferral ------------------------------------------------------------------

    def defer(
        self, request: Any, wait: float, deferrals: int, *, reserved: bool, reason: str = "tenant"
    ) -> bool:
        """Publish the task again to run in ``wait`` s (+ jitter); ack this delivery.

        False (and the task runs now) when the publish fails: never lost.
        """
        wait = min(max(wait, 0.0), self.horizon)
        wait += random.uniform(0.0, min(1.0, 0.1 * wait + 0.05))
        raw = request._message
        headers = dict(raw.headers or {})
        headers[DEFERRALS] = deferrals + 1
        if reserved:
            headers[RESERVED] = 1
        else:
            headers.pop(RESERVED, None)
        task_message = (headers, None, None, None)
        message.defer(task_message, wait)
        properties = raw.properties or {}
        try:
            with self.app.producer_or_acquire() as producer:
                producer.publish(
                    raw.body,
                    exchange=self.pool.queue,
                    routing_key=self.target,
                    headers=headers,
                    content_type=raw.content_type,
                    content_encoding=raw.content_encoding,
                    correlation_id=properties.get("correlation_id"),
                    reply_to=properties.get("reply_to"),
                    priority=(raw.delivery_info or {}).get("priority"),
                    retry=True,
                    retry_policy={"max_retries": 3, "interval_start": 0.1},
                )
        except Exception:
            logger.exception(
                "celery-bulkhead: pool %r: could not defer task %s; running it now",
                self.pool.name,
                request.id,
            )
            return False
        if self.metrics is not None:
            self.metrics.throttled() if reason == "tenant" else self.metrics.breaker_refused(
                self.circuit.name if self.circuit else "?", "deferred"
            )
        task_ready(request)
        request.acknowledge()
        return True
