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

from .. import settings
from ..bulkhead import installed_on
from ..errors import ConfigurationError
from ..pool import Pool
from .gate import WorkerGate
from .metrics import PoolMetrics
from .request import request_class as worker_request_class

__all__ = ["PoolWorkerStep"]

logger = logging.getLogger(__name__)


class PoolWorkerStep(bootsteps.StartStopStep):
    """Worker bootstep binding a worker node to its bulkhead pool."""

    # Celery instantiates every step before it creates the execution pool, so
    # per-task settings made in __init__ are inherited by prefork children.
    label = "bulkhead"

    def __init__(
        self,
        parent: Any,
        bulkhead_pool: str | None = None,
        bulkhead_metrics_port: int | None = None,
        bulkhead_metrics_host: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(parent, **kwargs)
        self.pool: Pool | None = None
        self.metrics: Any = None
        self.metrics_port = bulkhead_metrics_port
        self.metrics_host = bulkhead_metrics_host or "127.0.0.1"
        self._server: Any = None
        # Any worker of the app may publish retries and chain steps of pool tasks.
        installed_on(parent.app).admission.in_worker = True
        if not bulkhead_pool:
            return
        bulkhead = installed_on(parent.app)
        pool = bulkhead.pool(bulkhead_pool)
        bulkhead.validate_tasks()
        circuit = bulkhead.circuit_of(pool)
        self.metrics = PoolMetrics(parent.app, pool, circuit)
        listeners: list[Any] = [self.metrics]
        self.gate: WorkerGate | None = None
        limiter = bulkhead.limiter if pool.tenant is not None and pool.tenant.at_worker else None
        if limiter is not None or circuit is not None:
            self.gate = WorkerGate(parent.app, pool, limiter, self.metrics, circuit)
            listeners.append(self.gate)
        gate = self.gate
        request_class = worker_request_class(pool.name, listeners, gate)
        for task in bulkhead.tasks_in(pool):
            # Celery reads acks_late and the Request class from the task object
            # when the consumer starts; set them on the instance so they hold
            # for this node only.
            task.acks_late = pool.acks_late
            task.Request = request_class  # type: ignore[assignment]  # stubs say str
        self.pool = pool
        logger.info(
            "celery-bulkhead: node serves pool %r (queue %r, concurrency %d)",
            pool.name,
            pool.queue,
            pool.concurrency,
        )

    def start(self, parent: Any) -> None:
        if getattr(self, "gate", None) is not None:
            self.gate.worker = parent  # type: ignore[union-attr]  # on_open="pause" needs it
        if self.pool is None or self.metrics_port is None:
            return
        from prometheus_client import start_http_server

        try:
            self._server, _ = start_http_server(
                self.metrics_port, addr=self.metrics_host, registry=self.metrics.registry
            )
        except OSError as exc:
            raise ConfigurationError(
                self.pool.name,
                settings.METRICS_PORT,
                self.metrics_port,
                "a free TCP port",
                detail=f"cannot listen on {self.metrics_host}: {exc}",
            ) from exc
        logger.info(
            "celery-bulkhead: metrics of pool %r on http://%s:%d/metrics",
            self.pool.name,
            self.metrics_host,
            self.metrics_port,
        )

    def stop(self, parent: Any) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

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
                "metrics": (
                    f"http://{self.metrics_host}:{self.metrics_port}/metrics"
                    if self._server is not None
                    else None
                ),
            }
        }
