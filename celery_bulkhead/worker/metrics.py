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
import math
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .. import message
from ..breaker import STATE_VALUES
from ..depth import queue_depth
from .request import OUTCOMES, BulkheadRequest, request_class

if TYPE_CHECKING:
    from celery import Celery
    from celery.worker.request import Request

    from ..breaker import Circuit
    from ..pool import Pool

__all__ = ["PoolMetrics"]

logger = logging.getLogger(__name__)

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
_DEPTH_CACHE_SECONDS = 1.0


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
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)  # present from the start
        self.duration = _Histogram(_DURATION_BUCKETS)
        self.wait = _Histogram(_WAIT_BUCKETS)
        self.malformed = 0
        self.throttled = 0

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
            malformed = CounterMetricFamily(
                "celery_bulkhead_malformed_headers",
                "Tasks whose bulkhead_published_at header was not a plausible time "
                "(not observed in queue_wait_seconds).",
                labels=["pool"],
            )
            malformed.add_metric([pool], self.malformed)
            throttled = CounterMetricFamily(
                "celery_bulkhead_tenant_throttled",
                "Tasks deferred because their tenant was over its limit.",
                labels=["pool", "side"],
            )
            throttled.add_metric([pool, "worker"], self.throttled)
        yield from (inflight, tasks, duration, wait, malformed, throttled)


class _BreakerStats(Collector):
    """A breaker's state (as this node last saw it), transitions and refusals."""

    def __init__(self, circuit: Circuit) -> None:
        self.circuit = circuit
        self.lock = threading.Lock()
        self.refused: dict[str, int] = dict.fromkeys(("deferred", "failed"), 0)

    def collect(self) -> Iterator[Any]:
        name = self.circuit.name
        state_value = None
        try:
            state, _ = self.circuit.state()  # a Redis read at most every cache_seconds
            state_value = STATE_VALUES.get(state)
        except Exception:  # a scrape must not crash; the series goes missing
            logger.warning("celery-bulkhead: could not read breaker %r", name)
        gauge = GaugeMetricFamily(
            "celery_bulkhead_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            labels=["breaker"],
        )
        if state_value is not None:
            gauge.add_metric([name], state_value)
        transitions = CounterMetricFamily(
            "celery_bulkhead_breaker_transitions",
            "Breaker transitions made by this node, by the state entered.",
            labels=["breaker", "state"],
        )
        for entered in STATE_VALUES:
            transitions.add_metric([name, entered], self.circuit.transitions.get(entered, 0))
        refused = CounterMetricFamily(
            "celery_bulkhead_breaker_refusals",
            "Tasks not run because the breaker was open, by what was done with them.",
            labels=["breaker", "action"],
        )
        with self.lock:
            for action, count in self.refused.items():
                refused.add_metric([name, action], count)
        yield from (gauge, transitions, refused)


class PoolMetrics:
    """The metrics of one pool on one worker node, in their own registry."""

    def __init__(self, app: Celery, pool: Pool, circuit: Circuit | None = None) -> None:
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
        self.breaker = _BreakerStats(circuit) if circuit is not None else None
        if self.breaker is not None:
            r.register(self.breaker)

    def breaker_refused(self, breaker: str, action: str) -> None:
        """A task was not run because its breaker was open (``deferred`` or ``failed``)."""
        if self.breaker is not None:
            with self.breaker.lock:
                self.breaker.refused[action] = self.breaker.refused.get(action, 0) + 1

    def throttled(self) -> None:
        """A task was deferred for its tenant (``side="worker"``)."""
        with self.stats.lock:
            self.stats.throttled += 1

    def request_class(self) -> type[BulkheadRequest]:
        """A Request class whose main-process callbacks update these metrics."""
        return request_class(self.pool.name, [self])

    # -- Listener: called from the request callbacks (main process) ---------------

    def started(self, request: Request) -> None:
        stats = self.stats
        now = time.time()
        stamp = request.request_dict.get(message.PUBLISHED_AT)
        waited = None if stamp is None else message.published_at(stamp, now)
        with stats.lock:
            stats.inflight += 1
            if waited is not None:
                stats.wait.observe(waited)
            elif stamp is not None:  # untrusted input: counted, never observed
                stats.malformed += 1

    def finished(
        self, request: Request, outcome: str, runtime: float | None, was_started: bool
    ) -> None:
        stats = self.stats
        with stats.lock:
            if was_started:
                stats.inflight -= 1
            if runtime is not None and math.isfinite(runtime):
                stats.duration.observe(max(0.0, runtime))
            stats.outcomes[outcome] = stats.outcomes.get(outcome, 0) + 1
