"""Submit-side admission: a pool's ``max_queue`` holds at publish time.

Every publish of a pool task (``delay``, ``apply_async``, ``send_task``,
canvas) reaches :meth:`Admission.send`, which Celery calls in place of its
own ``send_task_message`` once the message is built and routed.  For a capped
pool it decides:

* **bypass** (never refused): a task's own retry (``self.retry``), and the
  later steps of work already admitted (the next step of a chain, a link
  callback or errback, a chord's body).  Refusing those would lose work.
  They go to the pool's *continuation queue* ``<queue>.continue``, which has
  no cap and is consumed by the same workers, so the cap itself stays exact
  on both brokers;
* **admit** when the queue holds fewer than ``max_queue`` ready messages,
  checked atomically with the push (Redis: one Lua call; RabbitMQ:
  ``x-max-length`` with ``reject-publish`` and publisher confirms;
  ``memory://``: under a process-wide lock); on another transport a capped
  publish raises :class:`ConfigurationError` rather than ignore the cap;
* otherwise the pool's ``on_full`` policy: ``reject`` raises
  :class:`PoolFull`, ``drop`` returns a :class:`DroppedResult` (counted and
  logged), ``block`` retries with a growing pause (5 ms to 100 ms) until room
  appears or ``block_timeout`` passes, then rejects.

A publish that cannot reach the broker gives up after ``publish_timeout``
seconds with :class:`BrokerUnavailable`.  Eager mode (``task_always_eager``)
never publishes, so it never meets admission.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from kombu.exceptions import LimitExceeded, OperationalError

from . import memory_cap, redis_cap
from .amqp_cap import ConfirmingProducers, mismatch_error
from .capped_push import CURRENT, CappedPush, QueueFull
from .errors import BrokerUnavailable, ConfigurationError, PoolFull
from .followups import bypass_reason, mark_follow_ups
from .metrics import DropLog, count_admission
from .results import fail_canvas_results
from .routing import continuation_queue

if TYPE_CHECKING:
    from celery import Celery
    from kombu import Queue

    from .pool import Pool

__all__ = ["PUBLISHED_AT_HEADER", "Admission", "Dropped"]

Sender = Callable[..., Any]

#: Header stamped on every pool publish: the publish time (epoch seconds), from
#: which workers measure queue wait.
PUBLISHED_AT_HEADER = "bulkhead_published_at"
_BACKOFF_MIN, _BACKOFF_MAX = 0.005, 0.1
#: kombu transports (``driver_type``) whose ``Channel._put`` admission hooks,
#: and the hook that makes a cap exact there.  RabbitMQ ("amqp") enforces caps itself.
_PUT_HOOKS = {"redis": redis_cap.install, "memory": memory_cap.install}
_CAPPED_TRANSPORTS = frozenset({"amqp", *_PUT_HOOKS})
_GROUPS_TRACKED = 64


class Dropped(Exception):
    """Internal: raised through Celery's send_task to return a DroppedResult."""

    def __init__(self, error: PoolFull) -> None:
        self.error = error
        super().__init__(str(error))


class Admission:
    """Applies the pools' caps and policies to publishes (one per Bulkhead)."""

    def __init__(self, app: Celery, pools: Mapping[str, Pool], publish_timeout: float) -> None:
        self.app = app
        self.publish_timeout = publish_timeout
        self.by_queue: dict[str, Pool] = {pool.queue: pool for pool in pools.values()}
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
            if driver in _PUT_HOOKS:
                _PUT_HOOKS[driver]()
            self._driver = driver
        return self._driver

    def _check_transport(self, pool: Pool) -> None:
        if self.driver not in _CAPPED_TRANSPORTS:
            raise ConfigurationError(
                pool.name,
                "max_queue",
                pool.max_queue,
                "None on this broker (caps are enforced on Redis, RabbitMQ and memory://)",
                detail=f"the {self.driver!r} transport cannot cap a queue exactly; "
                "refusing to publish rather than ignore the cap",
            )

    def _connect(self, connection: Any, deadline: float) -> None:
        """(Re)connect within ``deadline``, not within kombu's own retry schedule.

        kombu reconnects lazily on the first use of a channel, retrying for
        ``broker_connection_timeout`` with pauses of 2 s and more: about 12 s
        for a broker that refuses connections, whatever ``publish_timeout``
        says.  Connecting here first keeps a publish within its bound.
        """
        if connection is None or connection.connected:
            return
        connection.ensure_connection(
            max_retries=None,
            timeout=max(deadline - time.monotonic(), 0.001),
            interval_start=_BACKOFF_MIN,
            interval_step=_BACKOFF_MIN,
            interval_max=_BACKOFF_MAX,
        )

    # -- group bookkeeping --------------------------------------------------------

    def _group_members(self, group_id: str | None) -> list[str] | None:
        if group_id is None:
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
        self, original: Sender, producer: Any, name: str, message: Any, options: dict[str, Any]
    ) -> Any:
        """Publish ``message`` with Celery's sender ``original``, or refuse it.

        ``options`` are the sender's keyword arguments, as a dict of the
        caller's own (passed on, not repacked: this is the hot path).
        """
        # Any publish may carry follow-ups that a pool's cap must later let through.
        mark_follow_ups(message)
        queue = options.get("queue")
        pool = self.by_queue.get(str(getattr(queue, "name", queue)))
        if pool is None:
            return original(producer, name, message, **options)
        now = message[0][PUBLISHED_AT_HEADER] = time.time()
        extra = options.get("headers")
        if extra and PUBLISHED_AT_HEADER in extra:
            # A retry re-sends its request's headers, which Celery merges in after
            # this: they must not carry the first publish's time.
            options["headers"] = {**extra, PUBLISHED_AT_HEADER: now}
        if pool.max_queue is None:
            count_admission(pool.name, "admitted", "uncapped")
            return original(producer, name, message, **options)
        headers = message[0]
        reason = bypass_reason(self.app, headers, self.in_worker, options.get("headers"))
        if reason is not None:
            count_admission(pool.name, "admitted", reason)
            follow_up = self.continuation_queues[pool.queue]
            options = dict(
                options, queue=follow_up, routing_key=follow_up.routing_key, declare=[follow_up]
            )
            return original(producer, name, message, **options)
        return self._send_capped(pool, original, producer, name, message, options, headers)

    def _send_capped(
        self,
        pool: Pool,
        original: Sender,
        producer: Any,
        name: str,
        message: Any,
        options: dict[str, Any],
        headers: Mapping[str, Any],
    ) -> Any:
        assert pool.max_queue is not None
        options["retry"] = False  # retried here, within publish_timeout
        group_id = headers.get("group")
        first: int | None = None
        if group_id is None and self._driver in _PUT_HOOKS and producer.connection.connected:
            # Fast path: one capped push, no bookkeeping, when it fits and works.
            try:
                first = self._publish_hooked(pool, original, producer, name, message, options)
            except Exception:
                first = -1  # go the careful way below, which retries broker errors
            if first is None:
                count_admission(pool.name, "admitted", "below_cap")
                return None
        self._check_transport(pool)
        members = self._group_members(group_id if isinstance(group_id, str) else None)
        started = time.monotonic()
        deadline = started + (pool.block_timeout if pool.on_full == "block" else 0.0)
        pause = _BACKOFF_MIN
        attempts = 0
        while True:
            attempts += 1
            if attempts == 1 and first is not None and first >= 0:
                depth: int | None = first  # the fast path's answer: full
            else:
                depth = self._try_publish(pool, original, producer, name, message, options)
            if depth is None:
                count_admission(
                    pool.name, "admitted", "after_wait" if attempts > 1 else "below_cap"
                )
                if members is not None:
                    members.append(headers["id"])
                return None
            now = time.monotonic()
            if pool.on_full == "block" and now + pause <= deadline:
                time.sleep(pause)
                pause = min(pause * 2, _BACKOFF_MAX)
                continue
            error = PoolFull(
                pool.name,
                depth,
                pool.max_queue,
                task_id=headers.get("id"),
                group_id=headers.get("group"),
                admitted=tuple(members or ()),
                waited=now - started if pool.on_full == "block" else 0.0,
            )
            # In a chord header a dropped member would stall the chord forever.
            if pool.on_full == "drop" and not headers.get("chord") and not _in_chord(message):
                count_admission(pool.name, "dropped", "queue_full")
                self._drops.dropped(pool.name, depth, pool.max_queue)
                fail_canvas_results(self.app, headers, message, error)
                raise Dropped(error)
            reason = "block_timeout" if pool.on_full == "block" else "queue_full"
            count_admission(pool.name, "rejected", reason)
            raise error

    def _try_publish(
        self,
        pool: Pool,
        original: Sender,
        producer: Any,
        name: str,
        message: Any,
        options: dict[str, Any],
    ) -> int | None:
        """Publish once (retrying broker errors); None when admitted, else the depth."""
        assert pool.max_queue is not None
        deadline = time.monotonic() + self.publish_timeout
        pause = _BACKOFF_MIN
        while True:
            try:
                if self.driver in _PUT_HOOKS:
                    self._connect(producer.connection, deadline)
                    return self._publish_hooked(pool, original, producer, name, message, options)
                return self._publish_amqp(pool, original, name, message, options, deadline)
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

    def _publish_hooked(
        self,
        pool: Pool,
        original: Sender,
        producer: Any,
        name: str,
        message: Any,
        options: dict[str, Any],
    ) -> int | None:
        token = CURRENT.set(self._pushes[pool.queue])
        try:
            original(producer, name, message, **options)
        except QueueFull as full:
            return full.depth
        finally:
            CURRENT.reset(token)
        return None

    def _publish_amqp(
        self,
        pool: Pool,
        original: Sender,
        name: str,
        message: Any,
        options: dict[str, Any],
        deadline: float,
    ) -> int | None:
        from amqp.exceptions import MessageNacked, PreconditionFailed

        try:
            with self._confirming.acquire(deadline, self._connect) as producer:
                # A broker that accepts the publish but never confirms it
                # (frozen) must not hold the publisher beyond the deadline.
                options["confirm_timeout"] = max(deadline - time.monotonic(), 0.001)
                original(producer, name, message, **options)
        except MessageNacked:
            return self._confirming.depth(pool.queue, deadline, self._connect)
        except PreconditionFailed as exc:
            error = mismatch_error(pool, exc)
            if error is None:
                raise
            raise error from exc
        return None


def _in_chord(message: Any) -> bool:
    body = message[2]
    if isinstance(body, tuple) and len(body) == 3 and isinstance(body[2], Mapping):
        return bool(body[2].get("chord"))
    return False
