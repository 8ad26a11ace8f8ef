"""The worker bootstep: makes a ``celery worker`` node serve one pool.

``celery bulkhead worker`` starts each pool's node with ``--bulkhead-pool
NAME``.  The step then applies the pool's per-task settings that Celery has no
worker flag for (``acks_late``), and reports the pool in ``celery inspect
stats`` (and Flower's worker page) through :meth:`PoolWorkerStep.info`.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from .bulkhead import installed_on
from .pool import Pool

__all__ = ["PoolWorkerStep"]

logger = logging.getLogger(__name__)


class PoolWorkerStep(bootsteps.StartStopStep):
    """Worker bootstep binding a worker node to its bulkhead pool."""

    # Celery instantiates every step before it creates the execution pool, so
    # per-task settings made in __init__ are inherited by prefork children.
    label = "bulkhead"

    def __init__(self, parent: Any, bulkhead_pool: str | None = None, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.pool: Pool | None = None
        if not bulkhead_pool:
            return
        bulkhead = installed_on(parent.app)
        pool = bulkhead.pool(bulkhead_pool)
        bulkhead.validate_tasks()
        for task in bulkhead.tasks_in(pool):
            # Celery reads acks_late from the task object when a request is
            # accepted; set it on the instance so it holds for this node only.
            task.acks_late = pool.acks_late
        self.pool = pool
        logger.info(
            "celery-bulkhead: node serves pool %r (queue %r, concurrency %d)",
            pool.name,
            pool.queue,
            pool.concurrency,
        )

    # celery-types declares info() -> None; Celery merges the returned dict into stats.
    def info(self, parent: Any) -> dict[str, Any]:  # type: ignore[override]
        pool = self.pool
        if pool is None:
            return {}
        return {
            "bulkhead": {
                "pool": pool.name,
                "queue": pool.queue,
                "concurrency": pool.concurrency,
                "max_queue": pool.max_queue,
                "on_full": pool.on_full,
                "prefetch_multiplier": pool.prefetch_multiplier,
                "acks_late": pool.acks_late,
                "time_limit": pool.time_limit,
                "soft_time_limit": pool.soft_time_limit,
                "drain_timeout": pool.drain_timeout,
            }
        }
