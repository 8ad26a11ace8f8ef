"""What ``celery bulkhead status`` reports: per pool, from the broker and the workers.

Depth comes from the broker (:func:`~celery_bulkhead.depth.queue_depth`:
on Redis every priority sub-queue, under the key prefix); consumers and in-flight tasks
come from the workers' remote-control replies (``inspect active_queues`` and
``inspect active``), so a node that does not answer within the timeout
counts as absent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .depth import queue_depth

if TYPE_CHECKING:
    from celery import Celery

    from .pool import Pool

__all__ = ["PoolStatus", "collect"]


@dataclass(frozen=True)
class PoolStatus:
    pool: str
    queue: str
    depth: int | None
    cap: int | None
    consumers: tuple[str, ...]
    inflight: int
    concurrency: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _depth(app: Celery, queue: str) -> int | None:
    try:
        with app.connection_for_read() as connection:
            return queue_depth(connection, queue)
    except Exception:
        return None


def collect(app: Celery, pools: list[Pool], timeout: float) -> list[PoolStatus]:
    inspect = app.control.inspect(timeout=timeout)
    queues_by_node: dict[str, Any] = inspect.active_queues() or {}
    active_by_node: dict[str, Any] = inspect.active() or {}
    statuses = []
    for pool in pools:
        nodes = tuple(
            sorted(
                node
                for node, queues in queues_by_node.items()
                if any(q.get("name") == pool.queue for q in queues or ())
            )
        )
        inflight = sum(
            1
            for node in nodes
            for request in active_by_node.get(node) or ()
            if (request.get("delivery_info") or {}).get("routing_key", "").startswith(pool.queue)
        )
        statuses.append(
            PoolStatus(
                pool.name,
                pool.queue,
                _depth(app, pool.queue),
                pool.max_queue,
                nodes,
                inflight,
                pool.concurrency,
            )
        )
    return statuses
