"""Submit-side admission: a publish into a pool's queue passes the pool's gates.

Every publish of a pool task (``delay``, ``apply_async``, ``send_task``,
canvas) reaches :meth:`Admission.send`, which Celery calls in place of its
own ``send_task_message`` once the message is built and routed.  The
publish then goes through a short list of gates, each answering
*admit*, *refuse* or *defer* with a reason (:class:`Decision`):

1. **bypass** (never refused): a pool with nothing to check; a task's own
   retry (``self.retry``) and the later steps of work already admitted (the
   next step of a chain, a link callback or errback, a chord's body).
   Refusing those would lose work.  In a capped pool they go to the pool's
   *continuation queue* ``<queue>.continue``, which has no cap and is
   consumed by the same workers, so the cap itself stays exact;
2. **breaker**: with ``Breaker(fail_fast_at_submit=True)``, an open breaker
   raises :class:`CircuitOpen` (its state as this process last saw it, at
   most ``cache_seconds`` old: no Redis call per publish);
3. **tenant**: the task's tenant spends a token of its
   :class:`~celery_bulkhead.TenantLimit` or meets ``on_limited``
   (:class:`TenantLimited`, a drop, or a deferral); on a Redis broker that
   holds the tenant state, in the same Lua call as the cap and the push;
4. **cap**: the publish itself, admitted only while the queue holds fewer
   than ``max_queue`` ready messages, checked atomically with the push
   (:mod:`celery_bulkhead.caps`: Redis, one Lua call; RabbitMQ,
   ``x-max-length`` with ``reject-publish`` and publisher confirms;
   ``memory://``, under a process-wide lock);
5. **on_full**, when the cap refused: ``reject`` raises :class:`PoolFull`,
   ``drop`` returns a :class:`DroppedResult` (counted and logged), ``block``
   tries the cap again with a growing pause (5 ms to 100 ms) until room
   appears or ``block_timeout`` passes, then rejects.

A publish that cannot reach the broker gives up with
:class:`BrokerUnavailable`; one deadline, set when the publish starts,
bounds every step of it.  Eager mode (``task_always_eager``) never
publishes, so it never meets admission.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from amqp.exceptions import MessageNacked, PreconditionFailed
from kombu.exceptions import LimitExceeded, OperationalError

from . import caps, message
from .breaker import OPEN
from .caps import CURRENT, HOOKED_TRANSPORTS, CappedPush, QueueFull, TenantRefused
from .caps.amqp import ConfirmingProducers, mismatch_error
from .errors import (
    BrokerUnavailable,
    CircuitOpen,
    ConfigurationError,
    PoolFull,
    Rejected,
    TenantLimited,
)
from .followups import bypass_reason, mark_follow_ups
from .metrics import DropLog, count_admission, count_throttled
from .results import fail_canvas_results
from .routing import consumed_queues, continuation_queue, pool_queue
from .tenants import HEADER_PREFIX, bucket_key
from .tenants.limiter import same_redis

if TYPE_CHECKING:
    from celery import Celery
    from kombu import Queue

    from .breaker import Circuit
    from .pool import Pool
    from .tenants import TenantLimit
    from .tenants.limiter import Limiter

__all__ = ["STARTED", "Admission", "Decision", "Dropped"]

Sender = Callable[..., Any]

_BACKOFF_MIN, _BACKOFF_MAX = 0.005, 0.1
#: The "cap" of a one-call tenant push into a pool without max_queue.
_NO_CAP = 2**62
_TENANT_PUSHES = 10_000

#: When the publish in progress started (monotonic): set around the producer
#: acquire by :mod:`celery_bulkhead.publishing`, so one deadline covers the
#: wait for a pooled producer and every step after it.
STARTED: ContextVar[float | None] = ContextVar("celery_bulkhead_publish_started", default=None)
_GROUPS_TRACKED = 64


@dataclass(frozen=True)
class Decision:
    """What a gate says of a publish: ``admit``, ``refuse`` or ``defer``, and why.

    ``reason`` is the ``reason`` label of ``celery_bulkhead_admissions_total``;
    ``depth`` is the queue depth a refusing cap saw; ``wait`` the seconds until
    a refused tenant's next token.
    """

    verdict: str
    reason: str
    depth: int = 0
    wait: float = 0.0

    @property
    def admitted(self) -> bool:
        return self.verdict == "admit"


_UNCAPPED = Decision("admit", "uncapped")
_RETRY = Decision("admit", "retry")
_CONTINUATION = Decision("admit", "continuation")
_BELOW_CAP = Decision("admit", "below_cap")
_AFTER_WAIT = Decision("admit", "after_wait")


class Dropped(Exception):
    """Internal: raised through Celery's send_task to return a DroppedResult."""

    def __init__(self, error: Rejected) -> None:
        self.error = error
        super().__init__(str(error))


class Admission:
    """Applies the pools' gates to publishes (one per Bulkhead)."""

    #: True: every publish goes straight to Celery (switched by celery_bulkhead.testing).
    disabled = False

    def __init__(
        self,
        app: Celery,
        pools: Mapping[str, Pool],
        publish_timeout: float,
        limiter: Limiter | None = None,
        circuits: Mapping[str, Circuit] | None = None,
    ) -> None:
        self.app = app
        self.limiter = limiter
        #: Pool name -> its breaker's circuit.
        self.circuits: dict[str, Circuit] = {}
        for pool in pools.values():
            if pool.breaker is not None and circuits is not None:
                self.circuits[pool.name] = circuits[pool.breaker.name or pool.name]
        #: Queues of the pools whose publishes go through more than gate 1.
        self._gated = {
            pool.queue
            for pool in pools.values()
            if pool.max_queue is not None
            or pool.tenant is not None
            or (pool.breaker is not None and pool.breaker.fail_fast_at_submit)
        }
        self.publish_timeout = publish_timeout
        self.by_queue: dict[str, Pool] = {pool.queue: pool for pool in pools.values()}
        #: Every queue a pool's workers consume (its own, its continuation
        #: queue) -> the pool: a publish by queue name to any of them is the pool's.
        self.by_consumed: dict[str, Pool] = {
            queue: pool for pool in pools.values() for queue in consumed_queues(pool)
        }
        #: (exchange, routing key) -> pool, for every way a publish reaches a
        #: pool's queues: its own direct exchange, and the default exchange
        #: (routing by queue name).  Continuation queues count as the pool's.
        self.by_route: dict[tuple[str, str], Pool] = {}
        for pool in pools.values():
            for queue in consumed_queues(pool):
                self.by_route[(pool.queue, queue)] = pool
                self.by_route[("", queue)] = pool
        self.main_queues: dict[str, Queue] = {
            pool.queue: pool_queue(pool) for pool in pools.values()
        }
        self.continuation_queues: dict[str, Queue] = {
            pool.queue: continuation_queue(pool)
            for pool in pools.values()
            if pool.max_queue is not None
        }
        self._pushes = {
            pool.queue: CappedPush(pool.queue, pool.max_queue)
            for pool in pools.values()
            if pool.max_queue is not None
        }
        self._one_call_pools: dict[str, bool] = {}
        self._tenant_pushes: dict[tuple[str, str], CappedPush] = {}
        self._confirming = ConfirmingProducers(app, connect_timeout=publish_timeout)
        self._driver: str | None = None
        self._drops = DropLog()
        self._groups: threading.local = threading.local()
        #: Set by the worker bootstep: only a worker runs tasks whose retries and
        #: follow-ups must bypass the cap; producers skip that check.
        self.in_worker = False

    # -- broker ----------------------------------------------------------------

    @property
    def driver(self) -> str:
        if self._driver is None:
            driver = str(self.app.connection_for_write().transport.driver_type)
            caps.install(driver)
            self._driver = driver
        return self._driver

    def _connect(self, connection: Any, deadline: float) -> None:
        """(Re)connect within ``deadline``, not within kombu's own retry schedule.

        kombu reconnects lazily on the first use of a channel, retrying for
        ``broker_connection_timeout`` with pauses of 2 s and more: about 12 s
        for a broker that refuses connections, whatever ``publish_timeout``
        says.  Connecting here first keeps a publish within its bound.
        """
        if connection is None or connection.connected:
            return
        # Each attempt's TCP and AMQP handshake within the time left, too.
        connection.connect_timeout = max(deadline - time.monotonic(), 0.001)
        connection.ensure_connection(
            max_retries=None,
            timeout=max(deadline - time.monotonic(), 0.001),
            interval_start=_BACKOFF_MIN,
            interval_step=_BACKOFF_MIN,
            interval_max=_BACKOFF_MAX,
        )

    def _is_broker_error(self, producer: Any, exc: BaseException) -> bool:
        connection = getattr(producer, "connection", None) or self.app.connection_for_write()
        # LimitExceeded: no connection of the confirm pool came free in time.
        errors = (
            *tuple(connection.connection_errors),
            OSError,
            TimeoutError,
            OperationalError,
            LimitExceeded,
        )
        return isinstance(exc, errors)

    # -- group bookkeeping --------------------------------------------------------

    def _group_members(self, group_id: Any) -> list[str] | None:
        if not isinstance(group_id, str):
            return None
        groups: OrderedDict[str, list[str]] | None = getattr(self._groups, "groups", None)
        if groups is None:
            groups = self._groups.groups = OrderedDict()
        members = groups.get(group_id)
        if members is None:
            members = groups[group_id] = []
            while len(groups) > _GROUPS_TRACKED:
                groups.popitem(last=False)
        return members

    # -- the publish path ---------------------------------------------------------

    def send(
        self, original: Sender, producer: Any, name: str, task_message: Any, options: dict[str, Any]
    ) -> Any:
        """Publish ``task_message`` with Celery's sender ``original``, or refuse it.

        ``options`` are the sender's keyword arguments, as a dict of the
        caller's own (passed on, not repacked: this is the hot path).
        """
        if self.disabled:  # bulkheads switched off for tests: no gate at all
            return original(producer, name, task_message, **options)
        # Any publish may carry follow-ups that a pool's cap must later let through.
        mark_follow_ups(task_message)
        queue = options.get("queue")
        if options.get("exchange") is None and not options.get("routing_key"):
            pool = self.by_consumed.get(str(getattr(queue, "name", queue)))
        else:
            pool = self._routed_by_exchange(queue, options)
        if pool is None:
            return original(producer, name, task_message, **options)
        headers = message.headers(task_message)
        now = headers[message.PUBLISHED_AT] = time.time()
        extra = options.get("headers")
        if extra and message.PUBLISHED_AT in extra:
            # A retry re-sends its request's headers, which Celery merges in after
            # this: they must not carry the first publish's time.
            options["headers"] = {**extra, message.PUBLISHED_AT: now}

        # Gate 1: bypass (a pool with no gates; a retry; a continuation).
        decision = self._bypass(pool, headers, options)
        if decision is not None:
            count_admission(pool.name, "admitted", decision.reason)
            if decision is not _UNCAPPED and pool.max_queue is not None:
                follow_up = self.continuation_queues[pool.queue]
                options = dict(
                    options,
                    queue=follow_up,
                    routing_key=follow_up.routing_key,
                    declare=[follow_up],
                )
            return original(producer, name, task_message, **options)

        # Gate 2: an open breaker fails fast (when the pool asks for it).
        circuit = self.circuits.get(pool.name)
        if circuit is not None and circuit.breaker.fail_fast_at_submit:
            state, retry_after = circuit.state()
            if state == OPEN and retry_after > 0:
                count_admission(pool.name, "rejected", "circuit_open")
                raise CircuitOpen(pool.name, circuit.name, retry_after, task_id=headers.get("id"))

        # Gate 3: the tenant's budget (reject, drop or defer when spent).  On a
        # Redis broker holding the tenant state too, it is spent by the cap's
        # own call below (one round trip); elsewhere with one call of its own.
        push = self._pushes.get(pool.queue)
        tenant = ""
        if pool.tenant is not None and pool.tenant.at_submit:
            tenant = self._tenant_id(pool, name, task_message, options)
            if self._one_call(pool):
                push = self._tenant_push(pool, tenant)
            else:
                self._tenant(pool, tenant, task_message)
        if push is None:
            count_admission(pool.name, "admitted", "uncapped")
            return original(producer, name, task_message, **options)

        # Gates 4 and 5: the cap, then on_full when it refuses.
        started = STARTED.get()
        deadline = (time.monotonic() if started is None else started) + self.publish_timeout
        if getattr(queue, "name", queue) != pool.queue:
            # Sent to a pool's queue by another way (an explicit exchange and
            # routing key, the continuation queue): new work meets the cap.
            main = self.main_queues[pool.queue]
            options = dict(
                options, queue=main, exchange=main.exchange.name, routing_key=main.routing_key
            )
        options["retry"] = False  # retried here, within the deadline
        members = self._group_members(headers.get("group"))
        decision = self._cap(
            pool, original, producer, name, task_message, options, deadline, push=push
        )
        if not decision.admitted and decision.reason != "tenant_limited":
            decision = self._on_full(
                pool, decision, original, producer, name, task_message, options, deadline, push
            )
        if decision.reason == "tenant_limited":
            self._limited(pool, tenant, decision.wait, task_message)
        count_admission(pool.name, "admitted", decision.reason)
        if members is not None:
            members.append(headers["id"])
        return None

    def _routed_by_exchange(self, queue: Any, options: Mapping[str, Any]) -> Pool | None:
        """The pool whose queue an explicit exchange and routing key reach, if any.

        Celery publishes to ``exchange or queue.exchange`` with ``routing_key
        or queue.routing_key``; the broker delivers where that leads, whatever
        ``queue`` says.  Judged here so that no publish enters a capped queue
        without admission.
        """
        exchange = options.get("exchange")
        if exchange is None:
            exchange = getattr(getattr(queue, "exchange", None), "name", None)
        routing_key = options.get("routing_key") or getattr(queue, "routing_key", None)
        exchange_name = getattr(exchange, "name", exchange)
        if not isinstance(exchange_name, str) or not isinstance(routing_key, str):
            return None
        return self.by_route.get((exchange_name, routing_key))

    def _bypass(
        self, pool: Pool, headers: Mapping[str, Any], options: Mapping[str, Any]
    ) -> Decision | None:
        """Gate 1: admit without a cap (an unlimited pool, a retry, a continuation)."""
        if pool.queue not in self._gated:
            return _UNCAPPED
        reason = bypass_reason(self.app, headers, self.in_worker, options.get("headers"))
        if reason is None:
            return None
        return _RETRY if reason == "retry" else _CONTINUATION

    def _tenant_id(
        self, pool: Pool, name: str, task_message: Any, options: Mapping[str, Any]
    ) -> str:
        """The publish's tenant id, checked (a ConfigurationError naming the pool if bad)."""
        limit = pool.tenant
        assert limit is not None
        headers: Mapping[str, Any] = message.headers(task_message)
        args, kwargs = message.arguments(task_message)
        extra = options.get("headers")
        if extra and isinstance(limit.key, str) and limit.key.startswith(HEADER_PREFIX):
            headers = {**headers, **extra}  # the headers= option, merged by Celery later
        try:
            return limit.tenant_of(args, kwargs, headers, name)
        except ConfigurationError as exc:
            raise ConfigurationError(
                pool.name, exc.setting, exc.value, exc.allowed, detail=exc.detail
            ) from exc.__cause__

    def _one_call(self, pool: Pool) -> bool:
        """Whether the tenant's token is spent in the cap's own Lua call."""
        one = self._one_call_pools.get(pool.queue)
        if one is None:
            limit = pool.tenant
            one = (
                limit is not None
                and limit.on_limited != "defer"  # a reservation rewrites the message's ETA
                and self.driver == "redis"
                and self.limiter is not None
                and same_redis(self.limiter.state_url, self.app)
            )
            self._one_call_pools[pool.queue] = one
        return one

    def _tenant_push(self, pool: Pool, tenant: str) -> CappedPush:
        """The one-call push of ``tenant``'s publishes into ``pool`` (a bounded cache)."""
        key = (pool.queue, tenant)
        push = self._tenant_pushes.get(key)
        if push is None:
            limit = pool.tenant
            assert limit is not None and limit.burst is not None
            interval = str(max(1, round(limit.interval * 1_000_000))).encode()
            bucket = (bucket_key(pool.name, tenant), interval, str(limit.burst).encode())
            push = CappedPush(pool.queue, pool.max_queue or _NO_CAP, bucket)
            if len(self._tenant_pushes) >= _TENANT_PUSHES:
                self._tenant_pushes.clear()  # tenants are unbounded: so is nothing here
            self._tenant_pushes[key] = push
        return push

    def _tenant(self, pool: Pool, tenant: str, task_message: Any) -> None:
        """Gate 3 with its own store call: spend a token, or apply ``on_limited``."""
        limit = pool.tenant
        assert limit is not None and self.limiter is not None
        deferring = limit.on_limited == "defer"
        taken = self.limiter.take(pool, tenant, self._horizon(limit) if deferring else 0.0)
        if taken is None:  # the state store did not answer in time
            count_admission(pool.name, "error", "state_unavailable")
            if limit.on_state_error == "allow":
                return
            count_admission(pool.name, "rejected", "state_unavailable")
            task_id = message.headers(task_message).get("id")
            raise TenantLimited(pool.name, tenant, 1.0, task_id=task_id)
        if taken.allowed and not taken.wait:
            return
        if taken.allowed:  # a slot reserved taken.wait seconds ahead: publish it for then
            count_throttled(pool.name, "producer")
            self.limiter.note_throttled(pool, tenant)
            message.defer(task_message, taken.wait)
            count_admission(pool.name, "deferred", "tenant_limited")
            return
        self._limited(pool, tenant, taken.wait, task_message)

    def _limited(self, pool: Pool, tenant: str, wait: float, task_message: Any) -> None:
        """The tenant is over its limit: ``on_limited`` (reject or drop), counted."""
        limit = pool.tenant
        assert limit is not None and self.limiter is not None
        count_throttled(pool.name, "producer")
        self.limiter.note_throttled(pool, tenant)
        headers = message.headers(task_message)
        error = TenantLimited(pool.name, tenant, wait, task_id=headers.get("id"))
        if limit.on_limited == "drop" and not message.in_chord(task_message):
            count_admission(pool.name, "dropped", "tenant_limited")
            fail_canvas_results(self.app, headers, task_message, error)
            raise Dropped(error)
        count_admission(pool.name, "rejected", "tenant_limited")
        raise error

    def _horizon(self, limit: TenantLimit) -> float:
        """How far ahead a deferred task may be scheduled: ``max_defer``, and on Redis
        under half the transport's ``visibility_timeout`` (a message held longer
        than that by a worker waiting for its ETA would be delivered twice)."""
        if self.driver != "redis":
            return limit.max_defer
        options = self.app.conf.broker_transport_options or {}
        visibility = float(options.get("visibility_timeout", 3600))
        return min(limit.max_defer, visibility / 2)

    def _cap(
        self,
        pool: Pool,
        original: Sender,
        producer: Any,
        name: str,
        task_message: Any,
        options: dict[str, Any],
        deadline: float,
        admitted: Decision = _BELOW_CAP,
        *,
        push: CappedPush | None = None,
    ) -> Decision:
        """Gate 4: publish below the cap (retrying broker errors until ``deadline``).

        ``push`` carries the cap to the transport hook, and on Redis maybe the
        tenant's bucket too (then the answer may be ``tenant_limited``).
        """
        pause = _BACKOFF_MIN
        while True:
            try:
                if self.driver in HOOKED_TRANSPORTS:
                    # Redis: the reconnect and the push within the time left (a retry, a block
                    # attempt, a publish that waited for a producer), not the fixed socket timeout.
                    with caps.within(self.driver, producer.connection, deadline):
                        self._connect(producer.connection, deadline)
                        token = CURRENT.set(push or self._pushes[pool.queue])
                        try:
                            original(producer, name, task_message, **options)
                        except QueueFull as full:
                            return Decision("refuse", "queue_full", full.depth)
                        except TenantRefused as limited:
                            return Decision("refuse", "tenant_limited", wait=limited.wait)
                        finally:
                            CURRENT.reset(token)
                        return admitted
                else:
                    caps.check_transport(pool, self.driver)
                    depth = self._publish_amqp(
                        pool, original, name, task_message, options, deadline
                    )
            except (PoolFull, Dropped):
                raise
            except Exception as exc:
                if not self._is_broker_error(producer, exc):
                    raise
                if time.monotonic() + pause > deadline:
                    count_admission(pool.name, "error", "broker_unavailable")
                    raise BrokerUnavailable(pool.name, self.publish_timeout, repr(exc)) from exc
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            if depth is None:
                return admitted
            return Decision("refuse", "queue_full", depth)

    def _on_full(
        self,
        pool: Pool,
        refused: Decision,
        original: Sender,
        producer: Any,
        name: str,
        task_message: Any,
        options: dict[str, Any],
        deadline: float,
        push: CappedPush | None = None,
    ) -> Decision:
        """Gate 5: the pool's ``on_full`` policy, once the cap refused."""
        assert pool.max_queue is not None
        started = time.monotonic()
        if pool.on_full == "block":
            room_by = started + pool.block_timeout
            broker_by = deadline + pool.block_timeout
            pause = _BACKOFF_MIN
            while time.monotonic() + pause <= room_by:
                time.sleep(pause)
                pause = min(pause * 2, _BACKOFF_MAX)
                refused = self._cap(
                    pool,
                    original,
                    producer,
                    name,
                    task_message,
                    options,
                    broker_by,
                    _AFTER_WAIT,
                    push=push,
                )
                if refused.admitted or refused.reason == "tenant_limited":
                    return refused
        headers = message.headers(task_message)
        error = PoolFull(
            pool.name,
            refused.depth,
            pool.max_queue,
            task_id=headers.get("id"),
            group_id=headers.get("group"),
            admitted=tuple(self._group_members(headers.get("group")) or ()),
            waited=time.monotonic() - started if pool.on_full == "block" else 0.0,
        )
        # In a chord header a dropped member would stall the chord forever.
        if pool.on_full == "drop" and not message.in_chord(task_message):
            count_admission(pool.name, "dropped", "queue_full")
            self._drops.dropped(pool.name, refused.depth, pool.max_queue)
            fail_canvas_results(self.app, headers, task_message, error)
            raise Dropped(error)
        reason = "block_timeout" if pool.on_full == "block" else "queue_full"
        count_admission(pool.name, "rejected", reason)
        raise error

    def _publish_amqp(
        self,
        pool: Pool,
        original: Sender,
        name: str,
        task_message: Any,
        options: dict[str, Any],
        deadline: float,
    ) -> int | None:
        """Publish on a confirm channel; None when confirmed, else the depth after a nack."""
        try:
            with self._confirming.acquire(deadline, self._connect) as producer:
                # A broker that accepts the publish but never confirms it
                # (frozen) must not hold the publisher beyond the deadline.
                options["confirm_timeout"] = max(deadline - time.monotonic(), 0.001)
                original(producer, name, task_message, **options)
        except MessageNacked:
            return self._confirming.depth(pool.queue, deadline, self._connect)
        except PreconditionFailed as exc:
            error = mismatch_error(pool, exc)
            if error is None:
                raise
            raise error from exc
        return None
