"""How many workers a pool needs: Little's law, with the rules that make it safe.

Little's law: in a stable system the average number of tasks in service is the
arrival rate times the time each one takes, ``L = rate * W``.  A pool with
``L`` workers is busy all the time; :func:`size` turns ``L`` into a
concurrency with these rules, in this order:

1. **Planning latency** ``W``: the p99 when known, else the mean (never below
   the mean).  Heavy-tailed latencies fill a pool sized by the mean.
2. **Utilisation**: plan for ``utilization`` busy (0.7 by default),
   ``N = L / 0.7``; above ~80 % queues grow non-linearly.  Or add a
   ``headroom`` instead: ``N = L * (1 + 0.2)``.
3. **Per instance**: ``ceil(N / instances)`` workers on each worker node.
4. **Downstream limit**: never more than the concurrent calls the downstream
   accepts, ``downstream // instances`` per node.  When the limit bites the
   plan says so; when even ``rate * mean`` is above it, the queue grows
   without bound and the pool needs a ``max_queue`` and an ``on_full`` policy.
5. **Queue cap** (with ``max_wait``): ``max_queue = drain rate * max_wait``;
   the queue drains as fast as work arrives, or at the workers' capacity when
   they cannot keep up.

:func:`read_metrics` and :func:`observe` estimate a workload from two scrapes
of pool workers' Prometheus metrics.  Everything here is pure: the caller
fetches the pages and prints the plan.  Bad input raises
:class:`~celery_bulkhead.ConfigurationError` naming the input, the value and
what is allowed; unusable metrics raise :class:`MetricsError`.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .errors import ConfigurationError
from .pool import MAX_CONCURRENCY
from .tenants import parse_rate

__all__ = [
    "DEFAULT_UTILIZATION",
    "MetricsError",
    "Observation",
    "Plan",
    "Snapshot",
    "Workload",
    "compare",
    "observe",
    "parse_count",
    "parse_fraction",
    "parse_rate",
    "parse_seconds",
    "quantile",
    "read_metrics",
    "size",
]

#: The busy fraction planned for when neither ``utilization`` nor ``headroom`` is given.
DEFAULT_UTILIZATION = 0.7
_SATURATION = 0.8  # above this busy fraction, queues grow non-linearly
MAX_SECONDS = 86_400.0
MAX_DOWNSTREAM = 10_000_000
MAX_INSTANCES = 10_000
MAX_HEADROOM = 10.0
_SECONDS = "seconds such as 0.5, '0.5s' or '500ms', above 0 and at most 1 day"


def _number(value: Any, units: dict[str, float]) -> float | None:
    """``value`` as a float, a string's unit suffix applied; None when it is not a number."""
    if isinstance(value, bool):
        return None
    scale = 1.0
    if isinstance(value, str):
        value = value.strip().lower()
        for suffix, factor in units.items():
            if value.endswith(suffix):
                value, scale = value[: -len(suffix)], factor
                break
    try:
        number = float(value) * scale
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def parse_seconds(value: Any, name: str) -> float:
    """Seconds from a number or a string such as ``"0.5"``, ``"0.5s"`` or ``"500ms"``."""
    seconds = _number(value, {"ms": 0.001, "s": 1.0})
    if seconds is None or not 0 < seconds <= MAX_SECONDS:
        raise ConfigurationError(None, name, value, _SECONDS)
    return seconds


def parse_fraction(value: Any, name: str, *, high: float, zero: bool) -> float:
    """A fraction from ``0.7`` or ``"70%"``, up to ``high``; 0 allowed only when ``zero``."""
    number = _number(value, {"%": 0.01})
    if number is None or not 0 <= number <= high or (number == 0 and not zero):
        low = "from 0" if zero else "above 0"
        raise ConfigurationError(
            None, name, value, f"a fraction such as 0.7 or '70%', {low} up to {high:g}"
        )
    return number


def parse_count(value: Any, name: str, maximum: int) -> int:
    """A whole number from 1 to ``maximum``, from an int or its decimal digits."""
    number = int(value) if isinstance(value, str) and value.strip().isdecimal() else value
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= maximum:
        raise ConfigurationError(None, name, value, f"a whole number from 1 to {maximum:,}")
    return number


def _round(value: float) -> float:
    # 5000 * 0.08 * 1.2 / 4 is 120.00000000000001 in floats: round the noise
    # away before rounding up, or the seeds' worked example asks for 121.
    return round(value, 9)


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What a pool must carry, checked when it is built.

    Args:
        rate: arrivals per second, fleet-wide (``"200/s"``, ``"600/m"``,
            ``"3600/h"`` or a number).
        latency: mean run time of a task in seconds (may be omitted when ``p99`` is given).
        p99: 99th-percentile run time in seconds; the pool is sized by it.
        downstream: the most concurrent calls the downstream accepts, fleet-wide.
        instances: worker nodes running the pool; the plan is per node.
        utilization: busy fraction to plan for (default 0.7); not with ``headroom``.
        headroom: extra fraction over ``L`` (0.2 is 20 %); not with ``utilization``.
        max_wait: longest acceptable queue wait in seconds, for a suggested ``max_queue``.
    """

    rate: float
    latency: float | None = None
    p99: float | None = None
    downstream: int | None = None
    instances: int = 1
    utilization: float | None = None
    headroom: float | None = None
    max_wait: float | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("rate", parse_rate(self.rate, "rate"))
        for name in ("latency", "p99", "max_wait"):
            if getattr(self, name) is not None:
                put(name, parse_seconds(getattr(self, name), name))
        if self.latency is None and self.p99 is None:
            raise ConfigurationError(None, "latency", None, "a mean latency, a p99, or both")
        put("instances", parse_count(self.instances, "instances", MAX_INSTANCES))
        if self.downstream is not None:
            put("downstream", parse_count(self.downstream, "downstream", MAX_DOWNSTREAM))
            if self.downstream < self.instances:
                raise ConfigurationError(
                    None,
                    "downstream",
                    self.downstream,
                    f"at least one call per instance (>= instances={self.instances})",
                    detail="every instance runs at least one worker: run fewer instances",
                )
        if self.headroom is not None:
            if self.utilization is not None:
                raise ConfigurationError(
                    None, "headroom", self.headroom, "no headroom when a utilization is given"
                )
            put("headroom", parse_fraction(self.headroom, "headroom", high=MAX_HEADROOM, zero=True))
        else:
            target = DEFAULT_UTILIZATION if self.utilization is None else self.utilization
            put("utilization", parse_fraction(target, "utilization", high=1.0, zero=False))


@dataclass(frozen=True)
class Plan:
    """The concurrency :func:`size` recommends, and every number it was worked from."""

    workload: Workload
    planning_latency: float  # W: the p99, or the mean (never below the mean)
    busy: float  # L = rate * W: workers busy on average at W
    needed: float  # N = L / utilization, or L * (1 + headroom); fleet-wide
    wanted: int  # ceil(N / instances): per instance, before the downstream limit
    per_instance: int  # the recommendation, per worker node
    capped: bool  # the downstream limit lowered the recommendation
    capacity: float  # tasks per second the recommended workers serve at the mean latency
    utilization: float  # their expected busy fraction at the mean latency
    backlog_growth: float  # tasks per second the queue grows by (0: it keeps up)
    max_queue: int | None  # drain rate * max_wait, when max_wait is given
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        """Workers across every instance."""
        return self.per_instance * self.workload.instances

    def as_dict(self) -> dict[str, Any]:
        """The plan as plain data (``--json``)."""
        return {**asdict(self), "total": self.total, "notes": list(self.notes)}

    def explain(self) -> list[str]:
        """The arithmetic, step by step, in one screen of text."""
        w, mean, lat = self.workload, self.workload.latency, self.planning_latency
        by = "mean" if mean is not None and lat == mean else "p99"
        also = f"; mean {_n(mean)} s" if by == "p99" and mean is not None else ""
        lines = [
            "Little's law: L = rate * W (tasks in service = arrival rate * time in service)",
            f"  rate {_n(w.rate)}/s; W = {_n(lat)} s (by the {by}{also})",
            f"1. busy workers: L = {_n(w.rate)}/s * {_n(lat)} s = {_n(self.busy)}",
        ]
        if w.headroom is not None:
            step = f"headroom {_pct(w.headroom)}: N = L * {_n(1 + w.headroom)}"
        else:
            assert w.utilization is not None
            step = f"target utilisation {_pct(w.utilization)}: N = L / {_n(w.utilization)}"
        lines.append(f"2. {step} = {_n(self.needed)}")
        share = f"{_n(self.needed)} / {w.instances} = {_n(self.needed / w.instances)}"
        lines.append(f"3. per instance: {share}, rounded up: {self.wanted}")
        if w.downstream is not None:
            limit = w.downstream // w.instances
            verdict = f"{self.wanted} > {limit}: capped at {limit}" if self.capped else "fits"
            lines.append(
                f"4. downstream accepts {w.downstream:,} concurrent calls: "
                f"{w.downstream:,} // {w.instances} = {limit} per instance; {verdict}"
            )
        lines.append(
            f"=> concurrency {self.per_instance} per instance "
            f"({w.instances} * {self.per_instance} = {self.total} workers)"
        )
        busy = f"busy {_pct(self.utilization)} of the time"
        if self.utilization > 1:
            busy = f"busy all the time (the work needs {_pct(self.utilization)} of them)"
        lines.append(
            f"   they serve {_n(self.capacity)}/s at the {'mean' if mean else 'p99'} "
            f"latency, {busy}"
        )
        if self.backlog_growth > 0:
            lines.append(
                f"   the queue grows by {_n(self.backlog_growth)} tasks/s "
                f"({_n(w.rate)}/s arrive, {_n(self.capacity)}/s are served)"
            )
        if self.max_queue is not None:
            assert w.max_wait is not None
            drain = min(w.rate, self.capacity)
            lines.append(
                f"   max_queue = drain rate * max wait = {_n(drain)}/s * {_n(w.max_wait)} s "
                f"= {self.max_queue:,}"
            )
        wrap = textwrap.TextWrapper(100, initial_indent="note: ", subsequent_indent="      ")
        return lines + [wrap.fill(note) for note in self.notes]


def size(workload: Workload) -> Plan:
    """Recommend a per-instance concurrency for ``workload`` (rules 1-5 of the module)."""
    w, mean = workload, workload.latency
    planning = max(x for x in (w.p99, mean) if x is not None)
    busy = w.rate * planning
    if w.headroom is not None:
        needed = busy * (1 + w.headroom)
    else:
        assert w.utilization is not None
        needed = busy / w.utilization
    wanted = max(1, math.ceil(_round(needed / w.instances)))
    limit = wanted if w.downstream is None else w.downstream // w.instances
    per_instance = min(wanted, limit)
    total = per_instance * w.instances
    service = planning if mean is None else mean
    capacity = total / service
    offered = w.rate * service  # workers busy on average at the mean latency
    growth = max(0.0, _round(w.rate - capacity))
    max_queue = None
    if w.max_wait is not None:
        max_queue = max(1, math.floor(_round(min(w.rate, capacity) * w.max_wait)))
    notes = []
    if w.p99 is None:
        notes.append("sized by the mean latency; pass --p99 when latencies have a long tail")
    elif mean is not None and w.p99 < mean:
        notes.append(f"the p99 ({_n(w.p99)} s) is below the mean ({_n(mean)} s): sized by the mean")
    if w.utilization is not None and w.utilization > _SATURATION:
        notes.append(f"above {_pct(_SATURATION)} busy, queues grow non-linearly: plan for ~70 %")
    if growth > 0:
        notes.append(
            f"the downstream limit ({w.downstream:,}) is below the work arriving "
            f"({_n(offered)} workers busy at the mean): the queue grows without bound. Give "
            "the pool a max_queue and an on_full policy, or get a higher limit downstream"
        )
    elif per_instance < wanted:
        notes.append(
            f"the downstream limit ({w.downstream:,}) leaves less room than planned: "
            f"{_pct(offered / total)} busy, so queue waits grow in bursts; give the pool a "
            "max_queue (see --max-wait)"
        )
    if per_instance > MAX_CONCURRENCY:
        notes.append(f"a pool's concurrency is at most {MAX_CONCURRENCY:,}: add instances")
    return Plan(
        workload=w,
        planning_latency=planning,
        busy=busy,
        needed=needed,
        wanted=wanted,
        per_instance=per_instance,
        capped=per_instance < wanted,
        capacity=capacity,
        utilization=offered / total,
        backlog_growth=growth,
        max_queue=max_queue,
        notes=tuple(notes),
    )


#: Above this many prefork processes per node, threads or gevent are the cheaper way to wait.
_MANY_PROCESSES = 32


def compare(
    plan: Plan,
    pool: str,
    concurrency: float,
    max_queue: int | None,
    worker_pool: str | None = None,
) -> list[str]:
    """Lines comparing ``plan`` with a pool's configured concurrency, ``max_queue`` and pool."""
    n, want = plan.workload.instances, plan.per_instance
    have = round(concurrency)
    lines = [
        f"pool {pool!r}: concurrency {have} * {n} instance(s) = {have * n} workers; "
        f"recommended {want} * {n} = {plan.total}"
    ]
    if have != want:
        verb = "raise" if have < want else "lower"
        lines.append(f"   {verb} the pool's concurrency from {have} to {want}")
    if plan.max_queue is not None:
        current = "none" if max_queue is None else f"{max_queue:,}"
        lines.append(f"   max_queue: configured {current}, suggested {plan.max_queue:,}")
    if worker_pool == "prefork" and want > _MANY_PROCESSES:
        lines.append(
            f"   {want} prefork processes per node is heavy: for tasks that mostly wait, "
            "worker_pool='threads'"
        )
    return lines


# -- a workload from a running pool's metrics ---------------------------------------


class MetricsError(ValueError):
    """A ``/metrics`` page holds no usable celery-bulkhead pool metrics."""


@dataclass(frozen=True)
class Snapshot:
    """One pool's series in one scrape of a worker's ``/metrics``."""

    pool: str
    finished: float  # celery_bulkhead_tasks_total, every outcome
    duration_sum: float
    duration_count: float
    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), +Inf last
    inflight: float = 0.0
    depth: float | None = None  # None: the worker could not read the broker
    concurrency: float | None = None


@dataclass(frozen=True)
class Observation:
    """What two scrapes ``window`` seconds apart tell of a pool's workload."""

    pool: str
    window: float
    finished: float  # tasks finished in the window
    rate: float  # arrivals per second: finished + queue growth + in-flight growth
    latency: float | None  # mean run time (None: no task has finished yet)
    p99: float | None
    samples: float  # tasks the latencies come from
    from_window: bool  # latencies of the window (else: since the workers started)
    concurrency: float | None  # of the scraped node(s), together
    nodes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_metrics(text: str, pool: str | None = None) -> Snapshot:
    """The series of ``pool`` (or of the only pool) in a Prometheus text exposition.

    Raises :class:`MetricsError` when the text is not an exposition, holds no
    ``celery_bulkhead_tasks_total`` and task duration histogram for the pool,
    or holds several pools and ``pool`` does not say which.
    """
    # Loaded here: every `celery` command imports the CLI, and with it this module.
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[tuple[str, str], float] = {}
    buckets: dict[str, dict[float, float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                owner = s.labels.get("pool")
                if owner is None or not s.name.startswith("celery_bulkhead_"):
                    continue
                if s.name == "celery_bulkhead_task_duration_seconds_bucket":
                    buckets.setdefault(owner, {})[float(s.labels["le"])] = s.value
                else:
                    values[s.name, owner] = values.get((s.name, owner), 0.0) + s.value
    except Exception as exc:  # the parser raises plain ValueErrors, and worse, on junk
        raise MetricsError(f"not a Prometheus text exposition ({exc})") from None
    pools = sorted(
        {p for (name, p) in values if name == "celery_bulkhead_tasks_total"} & {*buckets}
    )
    if not pools:
        raise MetricsError("no celery-bulkhead pool metrics (celery_bulkhead_tasks_total)")
    if pool is None and len(pools) > 1:
        raise MetricsError(f"metrics of several pools ({', '.join(pools)}): name one with --pool")
    chosen = pools[0] if pool is None else pool
    if chosen not in pools:
        raise MetricsError(f"no metrics of pool {chosen!r} (found: {', '.join(pools)})")

    def get(name: str) -> float | None:
        return values.get((f"celery_bulkhead_{name}", chosen))

    return Snapshot(
        pool=chosen,
        finished=get("tasks_total") or 0.0,
        duration_sum=get("task_duration_seconds_sum") or 0.0,
        duration_count=get("task_duration_seconds_count") or 0.0,
        buckets=tuple(sorted(buckets[chosen].items())),
        inflight=get("inflight") or 0.0,
        depth=get("queue_depth"),
        concurrency=get("concurrency"),
    )


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a cumulative histogram, as Prometheus' ``histogram_quantile``.

    Linear within the bucket the rank falls in; the highest finite bound (a
    lower bound of the truth) when it falls in ``+Inf``; None when empty.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return bound if inside <= 0 else lower + (bound - lower) * (rank - below) / inside
        lower, below = bound, count
    return lower


def observe(first: Sequence[Snapshot], second: Sequence[Snapshot], window: float) -> Observation:
    """A workload from two scrapes of the same pool node(s), ``window`` seconds apart.

    Arrivals are the tasks finished plus the growth of the queue and of the
    tasks in flight: a saturated pool finishes only what it can while the rest
    waits.  Latencies come from the tasks finished in the window, or from every
    task since the workers started when none finished in it.
    """
    a, b = _merged(first), _merged(second)
    if [x for x, _ in a.buckets] != [x for x, _ in b.buckets]:
        raise MetricsError("the duration buckets changed between scrapes")
    if b.finished < a.finished or b.duration_count < a.duration_count:
        raise MetricsError("the counters went backwards: a worker restarted between scrapes")
    depth = 0.0 if a.depth is None or b.depth is None else b.depth - a.depth
    finished = b.finished - a.finished
    count, total = b.duration_count - a.duration_count, b.duration_sum - a.duration_sum
    window_buckets = tuple((x, n - m) for (x, n), (_, m) in zip(b.buckets, a.buckets, strict=True))
    from_window = count > 0
    if not from_window:
        count, total, window_buckets = b.duration_count, b.duration_sum, b.buckets
    return Observation(
        pool=b.pool,
        window=window,
        finished=finished,
        rate=max(0.0, finished + depth + b.inflight - a.inflight) / window,
        latency=total / count if count > 0 else None,
        p99=quantile(0.99, window_buckets),
        samples=count,
        from_window=from_window,
        concurrency=b.concurrency,
        nodes=len(second),
    )


def _merged(nodes: Sequence[Snapshot]) -> Snapshot:
    """Several nodes of one pool as one: counters add up, the shared queue counts once."""
    if not nodes:
        raise MetricsError("no node scraped")
    bounds = {tuple(x for x, _ in node.buckets) for node in nodes}
    if len(bounds) != 1 or len({node.pool for node in nodes}) != 1:
        raise MetricsError("the endpoints are not nodes of one pool with the same buckets")
    depths = [node.depth for node in nodes if node.depth is not None]
    sizes = [node.concurrency for node in nodes if node.concurrency is not None]
    return Snapshot(
        pool=nodes[0].pool,
        finished=sum(node.finished for node in nodes),
        duration_sum=sum(node.duration_sum for node in nodes),
        duration_count=sum(node.duration_count for node in nodes),
        buckets=tuple(
            (x, sum(node.buckets[i][1] for node in nodes))
            for i, (x, _) in enumerate(nodes[0].buckets)
        ),
        inflight=sum(node.inflight for node in nodes),
        depth=max(depths) if depths else None,
        concurrency=sum(sizes) if sizes else None,
    )


def _n(value: float | None) -> str:
    """A number for reading: thousands separated, two decimals at most (3 digits below 1)."""
    if value is None:
        return "?"
    if value == 0 or abs(value) >= 1:
        return f"{value:,.2f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.3g} %"
