"""What the runs measured: a table per run and pool, the verdict, a chart, a JSON summary.

Every number comes from the run: latencies from the tasks' own records (submit
→ end, both ``time.time()`` on this machine), refusals from what admission
answered the producer, depths from the broker, deferrals and breaker
transitions from the workers.  The verdict compares the two runs' payments
p99 and says plainly when the bulkheads did not make it far lower.

matplotlib is imported only by :func:`write_chart`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .story import FLOOD_TENANT, POOLS

if TYPE_CHECKING:
    from .measure import RunResult

__all__ = [
    "FAR_BELOW",
    "PoolStats",
    "Verdict",
    "render_table",
    "summarize",
    "verdict",
    "write_chart",
]

#: "Far below": the bulkhead run's payments p99 is at most this fraction of the plain run's.
FAR_BELOW = 0.2
_COLORS = {"payments": "#1f77b4", "webhooks": "#d62728", "reports": "#2ca02c", "shared": "#444444"}


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), linear interpolation; None when there is nothing."""
    data = sorted(values)
    if not data:
        return None
    rank = (len(data) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


@dataclass
class PoolStats:
    """One pool in one run.  ``None`` means "no such thing in this run" (plain Celery)."""

    pool: str
    sent: int  # publishes attempted
    completed: int  # ran and succeeded
    failed: int  # ran and failed (the downstream timed out or answered 503)
    unfinished: int  # admitted, not finished when the run ended
    p50: float | None  # seconds, submit -> end, over the tasks that ran
    p99: float | None
    worst: float | None
    rejected: int | None
    dropped: int | None
    throttled: int | None
    deferred: int | None
    max_depth: int | None
    cap: int | None
    shared_queue: bool
    breaker: dict[str, int] | None = None


def summarize(run: RunResult) -> dict[str, PoolStats]:
    """Per pool: what was sent, what became of it, how long it took."""
    bulkhead = run.mode == "bulkhead"
    stats: dict[str, PoolStats] = {}
    entered = Counter(state for _, state in run.breaker)
    for pool in POOLS:
        sent = [s for s in run.sent if s.pool == pool]
        outcomes = Counter(s.outcome for s in sent)
        records = [r for r in run.records.values() if r.pool == pool]
        latencies = [r.latency for r in records]
        failed = sum(1 for r in records if r.failed)
        label = pool if bulkhead else "shared"
        depths = [depth for _, depth in run.depth.get(label, [])]
        metrics = run.metrics.get(pool, {})
        if metrics:
            deferred: int | None = int(
                metrics.get("deferred_tenant", 0) + metrics.get("breaker_deferred", 0)
            )
        else:
            deferred = sum(r.deferrals for r in records) if bulkhead else None
        stats[pool] = PoolStats(
            pool=pool,
            sent=len(sent),
            completed=len(records) - failed,
            failed=failed,
            unfinished=max(outcomes["sent"] - len(records), 0),
            p50=percentile(latencies, 50),
            p99=percentile(latencies, 99),
            worst=max(latencies) if latencies else None,
            rejected=outcomes["rejected"] if bulkhead else None,
            dropped=outcomes["dropped"] if bulkhead else None,
            throttled=outcomes["throttled"] if bulkhead else None,
            deferred=deferred,
            max_depth=max(depths) if depths else None,
            cap=run.caps.get(label),
            shared_queue=not bulkhead,
            breaker=dict(entered) if bulkhead and pool == "webhooks" else None,
        )
        if outcomes["error"]:
            stats[pool].rejected = (stats[pool].rejected or 0) + outcomes["error"]
    return stats


@dataclass
class Verdict:
    """Did the bulkheads keep payments fast, and did every cap hold?"""

    plain_p99: float | None
    bulkhead_p99: float | None
    ratio: float | None
    caps_held: bool
    passed: bool
    reasons: list[str] = field(default_factory=list)


def verdict(plain: dict[str, PoolStats], bulkhead: dict[str, PoolStats]) -> Verdict:
    a, b = plain["payments"].p99, bulkhead["payments"].p99
    reasons = []
    ratio = b / a if a and b is not None else None
    if ratio is None:
        reasons.append(
            "payments did not complete in one of the runs, so there is no p99 to compare"
        )
    elif ratio > FAR_BELOW:
        reasons.append(
            f"the bulkhead run's payments p99 ({fmt_seconds(b)}) is not far below the plain "
            f"run's ({fmt_seconds(a)}): {ratio:.2f} of it, and the demo expects at most "
            f"{FAR_BELOW:g}"
        )
    over = [
        f"{s.pool} reached {s.max_depth} ready messages, over its cap of {s.cap}"
        for s in bulkhead.values()
        if s.cap is not None and s.max_depth is not None and s.max_depth > s.cap
    ]
    reasons += over
    lost = bulkhead["payments"].unfinished + bulkhead["payments"].failed
    if lost:
        reasons.append(f"{lost} payment(s) did not complete in the bulkhead run")
    return Verdict(a, b, ratio, not over, not reasons, reasons)


# -- the table -------------------------------------------------------------------------


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1.0:
        return f"{value * 1000:.0f} ms"
    return f"{value:.1f} s"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _depth(s: PoolStats) -> str:
    if s.max_depth is None:
        return "-"
    if s.shared_queue:
        return f"{s.max_depth} (one queue)"
    return f"{s.max_depth}/{s.cap if s.cap is not None else 'none'}"


def _breaker(s: PoolStats) -> str:
    if s.breaker is None:
        return "-"
    if not s.breaker:
        return "stayed closed"
    return ", ".join(
        f"{state} {s.breaker[state]}"
        for state in ("open", "half-open", "closed")
        if s.breaker.get(state)
    )


HEADER = (
    "run",
    "pool",
    "sent",
    "completed",
    "failed",
    "p50",
    "p99",
    "rejected",
    "dropped",
    "throttled",
    "deferred",
    "max depth/cap",
    "breaker (entered)",
)


def render_table(runs: list[tuple[str, dict[str, PoolStats]]]) -> str:
    rows = [HEADER]
    for label, stats in runs:
        for s in stats.values():
            rows.append(
                (
                    label,
                    s.pool,
                    str(s.sent),
                    str(s.completed),
                    str(s.failed),
                    fmt_seconds(s.p50),
                    fmt_seconds(s.p99),
                    _count(s.rejected),
                    _count(s.dropped),
                    _count(s.throttled),
                    _count(s.deferred),
                    _depth(s),
                    _breaker(s),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    numeric = {2, 3, 4, 5, 6, 7, 8, 9, 10}
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell.rjust(w) if i in numeric and n else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- the chart -------------------------------------------------------------------------


def write_chart(runs: list[RunResult], stats: dict[str, dict[str, PoolStats]], path: Path) -> Path:
    """Latency over time per pool, and queue depth, both runs side by side; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2,
        len(runs),
        figsize=(14, 8),
        sharex="all",
        sharey="row",
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1.4]},
    )
    depth_seen = max((d for run in runs for xs in run.depth.values() for _, d in xs), default=0)
    for col, run in enumerate(runs):
        timeline = run.timeline
        top, bottom = axes[0][col], axes[1][col]
        for ax in (top, bottom):
            ax.axvspan(timeline.hang_at, timeline.fail_at, color="#d62728", alpha=0.10, lw=0)
            ax.axvspan(timeline.fail_at, timeline.recover_at, color="#ff7f0e", alpha=0.10, lw=0)
            ax.axvline(timeline.flood_at, color="#2ca02c", ls="--", lw=1)
            ax.grid(True, alpha=0.3)
        for pool in POOLS:
            done = [r for r in run.records.values() if r.pool == pool]
            ok = [r for r in done if not r.failed]
            bad = [r for r in done if r.failed]
            color = _COLORS[pool]
            top.scatter(
                [r.submitted - run.start for r in ok],
                [max(r.latency, 1e-3) for r in ok],
                s=10,
                color=color,
                alpha=0.7,
                label=f"{pool} (p99 {fmt_seconds(stats[run.mode][pool].p99)})",
            )
            if bad:
                top.scatter(
                    [r.submitted - run.start for r in bad],
                    [max(r.latency, 1e-3) for r in bad],
                    s=14,
                    color=color,
                    marker="x",
                    alpha=0.6,
                    label=f"{pool}, failed",
                )
        for at, state in run.breaker:
            if state in ("open", "closed"):
                color = "#d62728" if state == "open" else "#2ca02c"
                top.axvline(at, color=color, ls=":", lw=1.2)
        top.set_yscale("log")
        top.set_title(f"{run.label}  {run.title}", fontsize=10, loc="left")
        top.legend(loc="upper right", fontsize=8, framealpha=0.9)
        for label, samples in run.depth.items():
            if not samples:
                continue
            color = _COLORS.get(label, "#444444")
            cap = run.caps.get(label)
            name = "one shared queue" if label == "shared" else f"{label} (cap {cap})"
            bottom.step(
                [t for t, _ in samples],
                [d for _, d in samples],
                where="post",
                color=color,
                lw=1.2,
                label=name,
            )
            # A cap far above anything seen (payments: 200) would flatten the others.
            if cap is not None and cap <= 3 * max(depth_seen, 1):
                bottom.axhline(cap, color=color, ls="--", lw=0.8, alpha=0.8)
        bottom.set_xlabel("seconds since the load started (submit time)")
        bottom.legend(loc="upper right", fontsize=8, framealpha=0.9)
    for col, run in enumerate(runs):
        top, timeline = axes[0][col], run.timeline
        low, high = top.get_ylim()
        top.text(timeline.hang_at, high, " API hangs", va="top", fontsize=8, color="#d62728")
        top.text(timeline.fail_at, high, " API fails", va="top", fontsize=8, color="#ff7f0e")
        top.text(
            timeline.flood_at,
            low * 1.3,
            f" {FLOOD_TENANT} floods reports",
            va="bottom",
            fontsize=7,
            color="#2ca02c",
        )
    axes[0][0].set_ylabel("latency, submit → done (s, log)")
    axes[1][0].set_ylabel("ready messages\n(dashed: cap)")
    if len(runs) == 2 and any(r.breaker for r in runs):
        axes[0][1].plot([], [], color="#d62728", ls=":", label="breaker opened")
        axes[0][1].plot([], [], color="#2ca02c", ls=":", label="breaker closed")
        axes[0][1].legend(loc="upper right", fontsize=8, framealpha=0.9)
    fig.suptitle(
        "celery-bulkhead demo: the same workload twice. Red band: the webhooks' API hangs; "
        "orange: it fails; green dashes: one tenant floods reports",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def as_json(stats: dict[str, PoolStats]) -> dict[str, Any]:
    return {pool: asdict(s) for pool, s in stats.items()}
