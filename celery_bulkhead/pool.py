"""The pool model: one typed, immutable, validated record per bulkhead.

A :class:`Pool` is pure configuration.  It is validated when it is built, so a
bad value fails at import time of the app module (or at worker start), never
in the middle of a publish.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .breaker import Breaker
from .errors import ConfigurationError
from .settings import seconds, whole
from .tenants import TenantLimit

__all__ = ["ON_FULL_POLICIES", "WORKER_POOLS", "Pool", "pools_from_setting"]

OnFull = Literal["reject", "drop", "block"]
ON_FULL_POLICIES: tuple[str, ...] = ("reject", "drop", "block")
WORKER_POOLS: tuple[str, ...] = ("prefork", "threads", "solo", "gevent", "eventlet")
_NO_TIME_LIMITS = ("threads", "solo")

# A pool name becomes part of a worker node name (``<pool>@%h``) and of a
# queue name, so it must survive both: no ``@``, no spaces, no separators
# that shells or Prometheus label values would mangle.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_QUEUE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")
_PATTERN_RE = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]{1,200}$")


def _fail(pool: str | None, setting: str, value: Any, allowed: str) -> ConfigurationError:
    return ConfigurationError(pool, setting, value, allowed)


#: Upper bounds that still work end to end (a worker can start, a broker takes
#: the value): RabbitMQ's x-max-length is a signed 32-bit field on the wire.
MAX_CONCURRENCY = 10_000
MAX_QUEUE = 2**31 - 1
MAX_PREFETCH = 65_535  # AMQP's prefetch count is 16 bits
MAX_BLOCK_TIMEOUT = 3600.0
MAX_TIME_LIMIT = 7 * 24 * 3600.0
MAX_DRAIN_TIMEOUT = 24 * 3600.0


@dataclass(frozen=True, init=False)
class Pool:
    """One bulkhead: a named pool with its own queue and its own workers.

    Every setting is keyword-only and checked at construction; a bad value
    raises :class:`~celery_bulkhead.ConfigurationError` naming the pool, the
    setting, the value and what is allowed.

    Args:
        name: the pool's name; workers are named ``<name>@<host>``.
        concurrency: worker processes/threads for this pool (>= 1).
        max_queue: cap on ready messages in the pool's queue, ``None`` for none.
        on_full: what a publish does when the queue is at ``max_queue``:
            ``"reject"`` (raise), ``"drop"`` (counted) or ``"block"`` (wait
            up to ``block_timeout`` seconds, then reject).
        block_timeout: longest wait, in seconds, for the ``"block"`` policy.
        tasks: task-name glob patterns (``"reports.*"``) assigned to this pool,
            for code whose decorators you cannot change.
        queue: the broker queue; defaults to ``"bulkhead.<name>"``.
        time_limit: hard time limit in seconds for the pool's workers
            (a task's own ``time_limit`` still wins).
        soft_time_limit: soft time limit in seconds; must be below ``time_limit``.
        prefetch_multiplier: messages reserved per worker process (1 keeps a
            hung task from sitting on messages other processes could run).
        acks_late: acknowledge after the task ran, so a worker that dies or is
            stopped hard mid-task has the message redelivered, not lost.
        drain_timeout: seconds a stopping worker may spend finishing running
            tasks before it is stopped hard.
        worker_pool: Celery execution pool of the pool's workers (``-P``).
        tenant: a :class:`~celery_bulkhead.TenantLimit` giving every tenant of
            the pool its own rate and in-flight budget (a mapping of its
            settings in ``bulkhead_pools``).
        breaker: a :class:`~celery_bulkhead.Breaker` guarding the pool's
            downstream, shared by the fleet (a mapping in ``bulkhead_pools``).
    """

    name: str
    concurrency: int = 1
    max_queue: int | None = None
    on_full: OnFull = "reject"
    block_timeout: float = 1.0
    tasks: tuple[str, ...] = ()
    queue: str = field(default="")
    time_limit: float | None = None
    soft_time_limit: float | None = None
    prefetch_multiplier: int = 1
    acks_late: bool = True
    drain_timeout: float = 30.0
    worker_pool: str = "prefork"
    tenant: TenantLimit | None = None
    breaker: Breaker | None = None

    def __init__(self, name: str, **settings: Any) -> None:
        # A hand-written __init__ keeps ``name`` positional (``Pool("io", ...)``)
        # while every other setting stays keyword-only, and turns an unknown
        # keyword into a ConfigurationError instead of a bare TypeError.
        pool_name = name if isinstance(name, str) else str(name)
        allowed = [f.name for f in fields(Pool) if f.name != "name"]
        for key in settings:
            if key not in allowed:
                raise ConfigurationError(
                    pool_name,
                    key,
                    settings[key],
                    "one of " + ", ".join(allowed),
                    detail="unknown setting",
                )
        object.__setattr__(self, "name", name)
        for f in fields(Pool):
            if f.name == "name":
                continue
            object.__setattr__(self, f.name, settings.get(f.name, f.default))
        self._validate()

    def _validate(self) -> None:
        name = self.name
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise _fail(
                None if not isinstance(name, str) else name,
                "name",
                name,
                "1-63 letters, digits, '_', '.' or '-', starting with a letter or digit",
            )
        whole(name, "concurrency", self.concurrency, maximum=MAX_CONCURRENCY)
        whole(name, "max_queue", self.max_queue, maximum=MAX_QUEUE, optional=True)
        if self.on_full not in ON_FULL_POLICIES:
            raise _fail(name, "on_full", self.on_full, "one of " + ", ".join(ON_FULL_POLICIES))
        object.__setattr__(
            self,
            "block_timeout",
            seconds(name, "block_timeout", self.block_timeout, maximum=MAX_BLOCK_TIMEOUT),
        )
        object.__setattr__(self, "tasks", self._validated_patterns(self.tasks))
        queue = self.queue or f"bulkhead.{name}"
        if not isinstance(queue, str) or not _QUEUE_RE.match(queue):
            raise _fail(
                name,
                "queue",
                self.queue,
                "a queue name of letters, digits, '_', '.', ':', '-' (at most 200 characters)",
            )
        object.__setattr__(self, "queue", queue)
        hard = seconds(name, "time_limit", self.time_limit, maximum=MAX_TIME_LIMIT, optional=True)
        soft = seconds(
            name, "soft_time_limit", self.soft_time_limit, maximum=MAX_TIME_LIMIT, optional=True
        )
        if hard is not None and soft is not None and soft >= hard:
            raise _fail(
                name,
                "soft_time_limit",
                self.soft_time_limit,
                f"a value below time_limit={self.time_limit!r}",
            )
        object.__setattr__(self, "time_limit", hard)
        object.__setattr__(self, "soft_time_limit", soft)
        whole(name, "prefetch_multiplier", self.prefetch_multiplier, maximum=MAX_PREFETCH)
        if not isinstance(self.acks_late, bool):
            raise _fail(name, "acks_late", self.acks_late, "True or False")
        object.__setattr__(
            self,
            "drain_timeout",
            seconds(name, "drain_timeout", self.drain_timeout, maximum=MAX_DRAIN_TIMEOUT),
        )
        object.__setattr__(self, "tenant", self._validated_tenant(self.tenant))
        object.__setattr__(self, "breaker", self._validated_breaker(self.breaker))
        if self.worker_pool not in WORKER_POOLS:
            raise _fail(name, "worker_pool", self.worker_pool, "one of " + ", ".join(WORKER_POOLS))
        if self.worker_pool in _NO_TIME_LIMITS:
            # Celery's threads and solo pools accept time limits and never
            # enforce them: refuse rather than promise what will not happen.
            for setting in ("time_limit", "soft_time_limit"):
                if getattr(self, setting) is not None:
                    raise _fail(
                        name,
                        setting,
                        getattr(self, setting),
                        f"None with worker_pool={self.worker_pool!r} (Celery does not enforce "
                        "time limits there; use 'prefork', 'gevent' or 'eventlet')",
                    )

    def _validated_tenant(self, value: Any) -> TenantLimit | None:
        if value is None or isinstance(value, TenantLimit):
            return value
        try:
            return TenantLimit.from_mapping(value)
        except ConfigurationError as exc:
            # Built from settings: the same error, naming this pool.
            raise ConfigurationError(
                self.name, exc.setting, exc.value, exc.allowed, detail=exc.detail
            ) from None

    def _validated_breaker(self, value: Any) -> Breaker | None:
        if value is None or isinstance(value, Breaker):
            return value
        try:
            return Breaker.from_mapping(value)
        except ConfigurationError as exc:
            raise ConfigurationError(
                self.name, exc.setting, exc.value, exc.allowed, detail=exc.detail
            ) from None

    def _validated_patterns(self, value: Any) -> tuple[str, ...]:
        allowed = "a list of task-name glob patterns such as 'reports.*'"
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise _fail(self.name, "tasks", value, allowed)
        patterns = tuple(value)
        for pattern in patterns:
            if not isinstance(pattern, str) or not _PATTERN_RE.match(pattern):
                raise ConfigurationError(
                    self.name, "tasks", value, allowed, detail=f"{pattern!r} is not a pattern"
                )
        if len(set(patterns)) != len(patterns):
            raise _fail(self.name, "tasks", value, allowed + ", each pattern once")
        return patterns

    @classmethod
    def from_mapping(cls, name: str, settings: Mapping[str, Any]) -> Pool:
        """Build a pool from a settings mapping (``app.conf.bulkhead_pools`` style)."""
        if not isinstance(settings, Mapping):
            raise _fail(name, "settings", settings, "a mapping of pool settings")
        data = dict(settings)
        inner = data.pop("name", name)
        if inner != name:
            raise _fail(name, "name", inner, f"the key it is listed under ({name!r})")
        return cls(name, **data)


def pools_from_setting(value: Any) -> tuple[Pool, ...]:
    """Turn the ``bulkhead_pools`` setting (or ``pools=`` argument) into pools.

    Accepted: a mapping ``{name: {setting: value}}``, or a sequence whose items
    are :class:`Pool` objects or mappings with a ``"name"`` key.
    """
    allowed = "a mapping {name: {setting: value}} or a list of Pool objects"
    if isinstance(value, Mapping):
        return tuple(
            item if isinstance(item, Pool) and item.name == key else Pool.from_mapping(key, item)
            for key, item in value.items()
        )
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _fail(None, "bulkhead_pools", value, allowed)
    pools: list[Pool] = []
    for item in value:
        if isinstance(item, Pool):
            pools.append(item)
        elif isinstance(item, Mapping) and isinstance(item.get("name"), str):
            pools.append(Pool.from_mapping(item["name"], item))
        else:
            raise _fail(None, "bulkhead_pools", item, allowed)
    return tuple(pools)
