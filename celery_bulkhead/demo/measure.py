"""What a run measures, and how: the data, the depth sampler, the metrics scrape.

A run is measured, not scripted: the producer notes what it sent and what
admission answered (:class:`Sent`); every task writes a record when it ends
(:class:`Record`, see :mod:`~celery_bulkhead.demo.story`); a sampler reads each
queue's depth from the broker ten times a second; the breaker's transitions
come from a listener in the workers; and, with bulkheads, each pool worker's
Prometheus endpoint is scraped at the end for what only the worker knows
(tasks deferred by the breaker or a tenant limit).
"""

from __future__ import annotations

import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from .story import PLAIN_CONCURRENCY, POOLS, DemoConfig, Mode, Timeline

__all__ = [
    "LABELS",
    "TITLES",
    "Record",
    "RunResult",
    "Sent",
    "queue_keys",
    "record_of",
    "sample_depths",
    "scrape_metrics",
]

_KOMBU_SEP = "\x06\x16"  # kombu's Redis priority sub-lists: <queue><sep><step>
_PRIORITY_STEPS = (3, 6, 9)
TITLES = {
    "plain": f"plain Celery: one queue, one worker, {PLAIN_CONCURRENCY} threads",
    "bulkhead": "bulkheads: a pool (queue + worker) per kind of work, "
    f"{PLAIN_CONCURRENCY} threads in all",
}
LABELS = {"plain": "A", "bulkhead": "B"}


@dataclass(frozen=True)
class Sent:
    """One publish and what admission said: sent, rejected, dropped, throttled or error."""

    pool: str
    seq: int
    tenant: str | None
    at: float  # time.time() just before apply_async
    outcome: str


@dataclass(frozen=True)
class Record:
    """What a task reported when it ended."""

    pool: str
    seq: int
    submitted: float
    started: float
    done: float
    failed: bool
    deferrals: int
    tenant: str | None = None

    @property
    def latency(self) -> float:
        return self.done - self.submitted


@dataclass
class RunResult:
    """Everything one run measured."""

    mode: Mode
    duration: float
    start: float = 0.0  # time.time() when the load started
    sent: list[Sent] = field(default_factory=list)
    records: dict[tuple[str, int], Record] = field(default_factory=dict)
    #: queue label (a pool, or "shared") -> [(seconds into the load, ready messages)]
    depth: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    caps: dict[str, int | None] = field(default_factory=dict)
    #: [(seconds into the load, state entered)]
    breaker: list[tuple[float, str]] = field(default_factory=list)
    #: pool -> numbers scraped from its worker's metrics endpoint
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    #: the downstream's calls by its state when they arrived
    calls: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return LABELS[self.mode]

    @property
    def title(self) -> str:
        return TITLES[self.mode]

    @property
    def timeline(self) -> Timeline:
        return Timeline(self.duration)


def record_of(entry: dict[str, Any], tenant_suffix: str) -> Record:
    """A task's record, as its JSON was written (the tenant without the run's suffix)."""
    tenant = entry.get("tenant")
    if tenant and tenant_suffix and tenant.endswith(tenant_suffix):
        tenant = tenant[: -len(tenant_suffix)]
    return Record(
        entry["pool"],
        entry["seq"],
        entry["submitted"],
        entry["started"],
        entry["done"],
        bool(entry.get("error")),
        int(entry.get("deferrals") or 0),
        tenant,
    )


def queue_keys(config: DemoConfig) -> dict[str, list[str]]:
    """The Redis lists holding each queue's ready messages (kombu's prefix and sub-lists)."""
    if config.mode == "plain":
        names = {"shared": config.plain_queue}
    else:
        names = {pool: config.queue_of(pool) for pool in POOLS}
    suffixes = ("", *(f"{_KOMBU_SEP}{step}" for step in _PRIORITY_STEPS))
    return {
        label: [f"{config.prefix}:{queue}{suffix}" for suffix in suffixes]
        for label, queue in names.items()
    }


def sample_depths(
    client: Any, keys: dict[str, list[str]], start: float, out: RunResult, stop: threading.Event
) -> None:
    """Each queue's ready messages, ten times a second, straight from Redis."""
    while not stop.wait(0.1):
        try:
            pipe = client.pipeline(transaction=False)
            for names in keys.values():
                for name in names:
                    pipe.llen(name)
            values = iter(pipe.execute())
        except Exception:
            continue
        at = time.time() - start
        for label, names in keys.items():
            out.depth.setdefault(label, []).append((at, sum(int(next(values)) for _ in names)))


def scrape_metrics(port: int) -> dict[str, float]:
    """The numbers of a pool worker's metrics endpoint that the report uses."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "celery_bulkhead_tenant_throttled_total":
                found["deferred_tenant"] = found.get("deferred_tenant", 0) + sample.value
            elif sample.name == "celery_bulkhead_breaker_refusals_total":
                found[f"breaker_{labels['action']}"] = sample.value
            elif sample.name == "celery_bulkhead_breaker_transitions_total":
                found[f"to_{labels['state']}"] = sample.value
            elif sample.name == "celery_bulkhead_tasks_total":
                found[f"outcome_{labels['outcome']}"] = sample.value
    return found
