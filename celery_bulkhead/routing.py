"""Routing: a ``task_routes`` router for pool tasks and the pools' kombu queues.

The router is prepended to the app's own ``task_routes`` and the pools' queues
are added to its ``task_queues``; both keep whatever the app already had, so
tasks in no pool route exactly as before.  Routing by router (rather than the
deprecated ``queue`` task attribute) means ``app.send_task("name")`` is routed
too.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from kombu import Exchange, Queue

from .assignment import Assignment
from .errors import ConfigurationError

if TYPE_CHECKING:
    from celery import Celery

    from .pool import Pool

__all__ = [
    "ROUTED_POOL",
    "BulkheadRouter",
    "consumed_queues",
    "continuation_queue",
    "install_routing",
    "pool_queue",
]


#: The pool the task being published was routed to (None: no pool), for the
#: producer acquire that follows routing in ``Celery.send_task``.
ROUTED_POOL: ContextVar[str | None] = ContextVar("celery_bulkhead_routed_pool", default=None)


class BulkheadRouter:
    """Routes a pool's tasks to the pool's queue; returns None for the rest.

    Celery calls it as ``router(name, args, kwargs, options, task=task)``.
    An explicit ``apply_async(queue=...)`` still wins, as it does for every
    Celery router.
    """

    def __init__(self, assignment: Assignment) -> None:
        self.assignment = assignment

    def __call__(
        self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any
    ) -> dict[str, str] | None:
        pool = self.assignment.resolve(name, task)
        if pool is None:
            ROUTED_POOL.set(None)
            return None
        ROUTED_POOL.set(pool.name)
        return {"queue": pool.queue}

    def __repr__(self) -> str:
        return f"<BulkheadRouter pools={list(self.assignment.pools)}>"


class PoolQueue(Queue):
    """A pool's kombu queue; its own class so re-installs recognise it."""


def pool_queue(pool: Pool) -> Queue:
    """The kombu queue a pool's tasks are published to and its workers consume.

    A capped pool's queue carries ``x-max-length`` with ``x-overflow:
    reject-publish``: RabbitMQ enforces the cap itself (the Redis transport
    ignores queue arguments; there the cap is enforced at publish time).
    """
    exchange = Exchange(pool.queue, type="direct")
    if pool.max_queue is None:
        return PoolQueue(pool.queue, exchange, routing_key=pool.queue)
    return PoolQueue(
        pool.queue,
        exchange,
        routing_key=pool.queue,
        max_length=pool.max_queue,
        queue_arguments={"x-overflow": "reject-publish"},
    )


def continuation_queue(pool: Pool) -> Queue:
    """A capped pool's uncapped queue for retries and later steps of admitted work."""
    name = consumed_queues(pool)[-1]
    return PoolQueue(name, Exchange(pool.queue, type="direct"), routing_key=name)


def consumed_queues(pool: Pool) -> list[str]:
    """Every queue a pool's workers consume, the pool's own queue first."""
    if pool.max_queue is None:
        return [pool.queue]
    return [pool.queue, f"{pool.queue}.continue"]


def _default_queue(app: Celery) -> Queue:
    conf = app.conf
    return Queue(
        conf.task_default_queue,
        Exchange(conf.task_default_exchange, type=conf.task_default_exchange_type),
        routing_key=conf.task_default_routing_key,
    )


def _merged_routes(existing: Any, router: BulkheadRouter) -> tuple[Any, ...]:
    if existing is None:
        routes: tuple[Any, ...] = ()
    elif isinstance(existing, (list, tuple)):
        routes = tuple(existing)
    else:
        routes = (existing,)
    routes = tuple(r for r in routes if not isinstance(r, BulkheadRouter))
    return (router, *routes)


def _queue_name(entry: Any, key: Any = None) -> str | None:
    if isinstance(entry, Queue):
        return str(entry.name)
    return None if key is None else str(key)


def install_routing(app: Celery, assignment: Assignment) -> None:
    """Merge the pools' router and queues into the app's configuration.

    Idempotent: installing twice (e.g. after a re-configuration) replaces the
    previous bulkhead router and queues instead of stacking them.
    """
    conf = app.conf
    router = BulkheadRouter(assignment)
    pools = list(assignment.pools.values())
    ours = {name for pool in pools for name in consumed_queues(pool)}
    default = conf.task_default_queue
    for pool in pools:
        if pool.queue == default:
            raise ConfigurationError(
                pool.name,
                "queue",
                pool.queue,
                "a queue other than the app's task_default_queue",
                detail="the default queue serves tasks in no pool",
            )
    existing = conf.task_queues
    added = [pool_queue(pool) for pool in pools]
    added += [continuation_queue(pool) for pool in pools if pool.max_queue is not None]
    if isinstance(existing, Mapping):
        merged_map: dict[Any, Any] = {}
        for key, entry in existing.items():
            name = _queue_name(entry, key)
            if name in ours and not isinstance(entry, PoolQueue):
                raise _clash(pools, name)
            if name not in ours:
                merged_map[key] = entry
        for queue in added:
            merged_map[queue.name] = queue
        conf.task_queues = merged_map
    else:
        kept: list[Any] = []
        for entry in existing or ():
            name = _queue_name(entry)
            if name in ours and not isinstance(entry, PoolQueue):
                raise _clash(pools, name)
            if name not in ours:
                kept.append(entry)
        if not existing:
            # With no task_queues Celery declares only the default queue; keep
            # it declared so tasks in no pool behave exactly as before.
            kept.append(_default_queue(app))
        conf.task_queues = [*kept, *added]
    conf.task_routes = _merged_routes(conf.task_routes, router)


def _clash(pools: list[Pool], name: str | None) -> ConfigurationError:
    pool = next(p for p in pools if name in consumed_queues(p))
    return ConfigurationError(
        pool.name,
        "queue",
        name,
        "a queue not already declared in the app's task_queues",
        detail="pick another queue= for the pool, or remove the app's own declaration",
    )
