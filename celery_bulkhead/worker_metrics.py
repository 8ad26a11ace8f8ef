"""Per-pool Prometheus metrics of a worker node, correct under prefork.

Everything is counted in the worker's *main* process, so no multiprocess
directory is needed: Celery calls a request's ``on_accepted``,
``on_success`` and ``on_failure`` callbacks in the main process whatever the
execution pool (prefork children report back to it).  The bootstep gives the
pool's tasks a :class:`Request` subclass that updates the metrics there, and
serves them from its own registry over HTTP, bound to ``127.0.0.1`` unless
told otherwise.  Queue depth is read from the broker when scraped (cached for
a second), counting Redis priority sub-queues and the key prefix.

Labels carry the pool name only: no tenant, no broker URL, no credentials.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from celery.exceptions import Reject, Retry, TimeLimitExceeded
from celery.worker.request import Request
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .admission import PUBLISHED_AT_HEADER
from .depth import queue_depth

if TYPE_CHECKING:
    from celery import Celery

    from .pool import Pool

__all__ = ["PoolMetrics"]

logger = logging.getLogger(__name__)

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
_DEPTH_CACHE_SECONDS = 1.0
_OUTCOMES = ("succeeded", "failed", "retried")


class _QueueDepth(Collector):
    """``celery_bulkhead_queue_depth{pool}``, read from the broker at scrape time."""

    def __init__(self, app: Celery, pool: Pool) -> None:
        self.app = app
        self.pool = pool
        self._lock = threading.Lock()
        self._cached: tuple[float, float] | None = None
        self._connection: Any = None

    def _read(self) -> float:
        if self._connection is None:
            self._connection = self.app.connection_for_read()
        try:
            return float(queue_depth(self._connection, self.pool.queue))
        except Exception:
            self._connection.collect()
            self._connection = None
            raise

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "celery_bulkhead_queue_depth",
            "Ready messages in the pool's queue, as the broker counts them.",
            labels=["pool"],
        )
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > _DEPTH_CACHE_SECONDS:
                try:
                    self._cached = (now, self._read())
                except Exception:  # a scrape must not crash; the series goes missing
                    logger.warning(
                        "celery-bulkhead: could not read the depth of %r", self.pool.queue
                    )
                    self._cached = None
            if self._cached is not None:
                family.add_metric([self.pool.name], self._cached[1])
        yield family


class _Histogram:
    """Bucket counts and a sum, as plain numbers (the caller holds the lock)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, documentation: str, pool: str) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, count in zip(
            (*map(floatToGoString, self.bounds), "+Inf"), self.counts, strict=True
        ):
            cumulative += count
            buckets.append((bound, cumulative))
        family = HistogramMetricFamily(name, documentation, labels=["pool"])
        family.add_metric([pool], buckets, self.sum)
        return family


class _TaskStats(Collector):
    """In-flight, outcomes, run time and queue wait of one pool's tasks on this node.

    Updated from the request callbacks in the worker's main process: plain
    numbers under one lock (a task costs two short critical sections), turned
    into Prometheus families only when scraped.
    """

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self.lock = threading.Lock()
        self.inflight = 0
        self.outcomes: dict[str, int] = dict.fromkeys(_OUTCOMES, 0)  # present from the start
        self.duration = _Histogram(_DURATION_BUCKETS)
        self.wait = _Histogram(_WAIT_BUCKETS)

    def collect(self) -> Iterator[Any]:
        pool = self.pool
        with self.lock:
            inflight = GaugeMetricFamily(
                "celery_bulkhead_inflight", "Tasks running now.", labels=["pool"]
            )
            inflight.add_metric([pool], self.inflight)
            tasks = CounterMetricFamily(
                "celery_bulkhead_tasks", "Tasks finished, by outcome.", labels=["pool", "outcome"]
            )
            for outcome, count in self.outcomes.items():
                tasks.add_metric([pool, outcome], count)
            duration = self.duration.family(
                "celery_bulkhead_task_duration_seconds", "Task run time.", pool
            )
            wait = self.wait.family(
                "celery_bulkhead_queue_wait_seconds", "Time from publish to task start.", pool
            )
        yield from (inflight, tasks, duration, wait)


class PoolMetrics:
    """The metrics of one pool on one worker node, in their own registry."""

    def __init__(self, app: Celery, pool: Pool) -> None:
        self.pool = pool
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"pool": pool.name}
        r = self.registry
        Gauge(
            "celery_bulkhead_concurrency",
            "Worker processes/threads of the pool on this node.",
            ["pool"],
            registry=r,
        ).labels(**labels).set(pool.concurrency)
        Gauge(
            "celery_bulkhead_consumers",
            "Worker nodes consuming the pool (1 per node).",
            ["pool"],
            registry=r,
        ).labels(**labels).set(1)
        if pool.max_queue is not None:
            Gauge(
                "celery_bulkhead_queue_cap", "The pool's max_queue.", ["pool"], registry=r
            ).labels(**labels).set(pool.max_queue)
        r.register(_QueueDepth(app, pool))
        self.stats = _TaskStats(pool.name)
        r.register(self.stats)

    def request_class(self) -> type[Request]:
        """A Request class whose main-process callbacks update these metrics."""
        return type(f"BulkheadRequest_{self.pool.name}", (_MeteredRequest,), {"_metrics": self})

    # -- called from the request callbacks (main process) ------------------------

    def started(self, published_at: Any) -> None:
        stats = self.stats
        waited = (
            max(0.0, time.time() - published_at)
            if isinstance(published_at, (int, float)) and not isinstance(published_at, bool)
            else None
        )
        with stats.lock:
            stats.inflight += 1
            if waited is not None:
                stats.wait.observe(waited)

    def finished(self, outcome: str, runtime: float | None, was_started: bool) -> None:
        stats = self.stats
        with stats.lock:
            if was_started:
                stats.inflight -= 1
            if runtime is not None:
                stats.duration.observe(max(0.0, runtime))
            stats.outcomes[outcome] = stats.outcomes.get(outcome, 0) + 1


def _outcome(exc: BaseException | None) -> str:
    if isinstance(exc, Retry):
        return "retried"
    if isinstance(exc, Reject):
        return "rejected"
    if isinstance(exc, TimeLimitExceeded):
        return "timed_out"
    if type(exc).__name__ == "Terminated":
        return "revoked"
    return "failed"


class _MeteredRequest(Request):
    """Counts a pool task's start and finish; a failing metric never breaks the task."""

    _metrics: PoolMetrics
    _bulkhead_started: float | None = None
    _bulkhead_done = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Celery derives a class of its own from this one (create_request_cls)
        # whose on_success does not call ours: wrap that one too.
        super().__init_subclass__(**kwargs)
        inner = cls.__dict__.get("on_success")
        if inner is not None and not getattr(inner, "_bulkhead", False):

            def on_success(self: _MeteredRequest, failed__retval__runtime: Any, **kw: Any) -> Any:
                self._bulkhead_succeeded(failed__retval__runtime)
                return inner(self, failed__retval__runtime, **kw)

            on_success._bulkhead = True  # type: ignore[attr-defined]
            cls.on_success = on_success  # type: ignore[method-assign]

    def _bulkhead_finish(self, outcome: str, runtime: float | None) -> None:
        if self._bulkhead_done:
            return
        self._bulkhead_done = True
        try:
            if runtime is None and self._bulkhead_started is not None:
                runtime = time.monotonic() - self._bulkhead_started
            self._metrics.finished(outcome, runtime, self._bulkhead_started is not None)
        except Exception:
            logger.exception("celery-bulkhead: could not update task metrics")

    def _bulkhead_succeeded(self, failed__retval__runtime: Any) -> None:
        failed, _, runtime = failed__retval__runtime
        if not failed:
            self._bulkhead_finish("succeeded", runtime)

    def on_accepted(self, pid: Any, time_accepted: float) -> None:
        if self._bulkhead_started is None:
            self._bulkhead_started = time.monotonic()
            try:
                self._metrics.started(self.request_dict.get(PUBLISHED_AT_HEADER))
            except Exception:
                logger.exception("celery-bulkhead: could not update task metrics")
        super().on_accepted(pid, time_accepted)

    def on_success(self, failed__retval__runtime: Any, **kwargs: Any) -> Any:
        self._bulkhead_succeeded(failed__retval__runtime)
        return super().on_success(failed__retval__runtime, **kwargs)

    on_success._bulkhead = True  # type: ignore[attr-defined]

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)  # unwrap ExceptionWithTraceback
        self._bulkhead_finish(_outcome(exc), None)
        return super().on_failure(
            exc_info, send_failed_event=send_failed_event, return_ok=return_ok
        )
