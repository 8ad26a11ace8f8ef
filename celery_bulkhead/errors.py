"""Errors raised by celery-bulkhead.

Every error has one root, so ``except BulkheadError`` catches them all::

    BulkheadError
    ├── ConfigurationError     a pool, a setting or a task assignment is invalid
    ├── BrokerUnavailable      a pool publish could not reach the broker in time
    │                          (also a kombu OperationalError)
    └── Rejected               a publish was refused by admission
        ├── PoolFull           the pool's queue holds max_queue ready messages
        ├── TenantLimited      the task's tenant is over its TenantLimit
        └── CircuitOpen        the pool's breaker is open (fail fast)

Errors carry data, not only a message: a ``ConfigurationError`` knows the pool,
the setting, the value that was refused and what would have been allowed; a
``PoolFull`` knows the pool, the queue depth it saw and the cap.
"""

from __future__ import annotations

from typing import Any

from kombu.exceptions import OperationalError

__all__ = [
    "BrokerUnavailable",
    "BulkheadError",
    "CircuitOpen",
    "ConfigurationError",
    "PoolFull",
    "Rejected",
    "TenantLimited",
]


class BulkheadError(Exception):
    """Root of every error celery-bulkhead raises."""


class ConfigurationError(BulkheadError, ValueError):
    """A pool, a setting or a task assignment is invalid.

    Raised at construction or decoration time, never at publish time when it
    can be avoided.  The message names the pool (``None`` when the error is
    not about one pool), the setting, the refused value and what is allowed.
    """

    def __init__(
        self,
        pool: str | None,
        setting: str,
        value: Any,
        allowed: str,
        detail: str | None = None,
    ) -> None:
        self.pool = pool
        self.setting = setting
        self.value = value
        self.allowed = allowed
        self.detail = detail
        where = f"pool {pool!r}: " if pool is not None else ""
        try:
            shown = repr(value)
        except ValueError:  # an int beyond Python's digit limit for str()
            shown = f"<{type(value).__name__} too large to show>"
        message = f"{where}invalid {setting}={shown}; allowed: {allowed}"
        if detail:
            message = f"{message} ({detail})"
        super().__init__(message)


class BrokerUnavailable(BulkheadError, OperationalError):
    """A publish to a pool could not reach the broker within the publish timeout.

    A kombu ``OperationalError`` too, so existing ``except OperationalError``
    handlers for a broker outage still catch it.

    Raised instead of hanging: a stopped or frozen broker makes the publish
    fail after about ``timeout`` seconds (``bulkhead_publish_timeout``).  The
    broker's own error is chained as ``__cause__``.
    """

    def __init__(self, pool: str, timeout: float, reason: str) -> None:
        self.pool = pool
        self.timeout = timeout
        self.reason = reason
        super().__init__(
            f"pool {pool!r}: broker unavailable, publish gave up within {timeout:g}s: {reason}"
        )


class Rejected(BulkheadError):
    """A publish was refused by admission; nothing was enqueued.

    ``pool`` is the pool's name; ``task_id`` the id of the refused task message.
    """

    task_id: str | None = None

    def __init__(self, pool: str, message: str) -> None:
        self.pool = pool
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


class PoolFull(Rejected):
    """The pool's queue already holds ``cap`` ready messages.

    Attributes:
        pool: the pool's name.
        depth: ready messages in the queue when the publish was refused.
        cap: the pool's ``max_queue``.
        task_id: the id of the refused task message.
        group_id: the group the refused message belonged to, if any.
        admitted: ids of that group's members this process already published
            before the refusal (they will run; revoke them if the group must
            not run partially).
        waited: seconds spent waiting for room (``on_full="block"``).
    """

    def __init__(
        self,
        pool: str,
        depth: int,
        cap: int,
        *,
        task_id: str | None = None,
        group_id: str | None = None,
        admitted: tuple[str, ...] = (),
        waited: float = 0.0,
    ) -> None:
        self.depth = depth
        self.cap = cap
        self.task_id = task_id
        self.group_id = group_id
        self.admitted = admitted
        self.waited = waited
        message = f"pool {pool!r} is full: {depth} ready messages, cap {cap}"
        if waited:
            message += f" (no room within {waited:.3g}s)"
        if group_id is not None:
            message += (
                f"; group {group_id} refused at task {task_id}, "
                f"{len(admitted)} earlier member(s) already published: {list(admitted)}"
            )
        super().__init__(pool, message)
        # What Celery's result backends keep of an exception is its args: with
        # these, a PoolFull stored as a task's failure comes back as a PoolFull.
        self.args = (pool, depth, cap)


class TenantLimited(Rejected):
    """The task's tenant is over its pool's :class:`~celery_bulkhead.TenantLimit`.

    Attributes:
        pool: the pool's name.
        tenant: the tenant id (the caller's own value, normalised).  It is
            kept out of the message, which may end up in logs.
        retry_after: seconds until the tenant's next token is due (for an
            in-flight cap: until the earliest running task's lease ends).
        task_id: the id of the refused task message.
    """

    def __init__(
        self, pool: str, tenant: str, retry_after: float, *, task_id: str | None = None
    ) -> None:
        self.tenant = tenant
        self.retry_after = retry_after
        self.task_id = task_id
        super().__init__(
            pool, f"pool {pool!r}: tenant over its limit, retry after {retry_after:.3g}s"
        )
        self.args = (pool, tenant, retry_after)


class CircuitOpen(Rejected):
    """The pool's circuit breaker is open: its downstream is failing.

    Raised at publish time by a pool whose ``Breaker(fail_fast_at_submit=True)``
    is open (so a web request can degrade instead of queueing doomed work), and
    stored as the failure of a task that a worker did not run
    (``on_open="fail"``).

    Attributes:
        pool: the pool's name.
        breaker: the breaker's name.
        retry_after: seconds until the breaker lets a trial call through.
    """

    def __init__(
        self, pool: str, breaker: str, retry_after: float, *, task_id: str | None = None
    ) -> None:
        self.breaker = breaker
        self.retry_after = retry_after
        self.task_id = task_id
        super().__init__(
            pool,
            f"pool {pool!r}: circuit {breaker!r} is open, next trial in {retry_after:.3g}s",
        )
        self.args = (pool, breaker, retry_after)
