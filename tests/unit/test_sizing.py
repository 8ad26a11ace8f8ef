"""Pool sizing by Little's law: hand-worked cases, the seeds' example, the downstream cap, edges."""

from __future__ import annotations

from typing import Any

import pytest

from celery_bulkhead import ConfigurationError
from celery_bulkhead.sizing import (
    MetricsError,
    Snapshot,
    Workload,
    compare,
    observe,
    parse_count,
    parse_fraction,
    parse_seconds,
    quantile,
    read_metrics,
    size,
)


def test_the_seeds_worked_example_gives_120_per_instance() -> None:
    """5,000 req/s, p99 80 ms, 4 instances, 20 % headroom: 400 busy, 100 each, 120 with headroom."""
    plan = size(Workload(rate="5000/s", p99="80ms", instances=4, headroom="20%"))
    assert plan.busy == pytest.approx(400)
    assert plan.needed == pytest.approx(480)
    assert plan.per_instance == 120  # not 121: float noise is rounded away before ceil
    assert plan.total == 480
    assert not plan.capped


def test_mean_latency_at_the_default_70_percent_utilisation() -> None:
    """200/s * 0.5 s = 100 busy; / 0.7 = 142.86; rounded up to 143."""
    plan = size(Workload(rate="200/s", latency=0.5))
    assert plan.busy == pytest.approx(100)
    assert plan.needed == pytest.approx(100 / 0.7)
    assert plan.per_instance == 143
    assert plan.utilization == pytest.approx(100 / 143)
    assert plan.capacity == pytest.approx(286)
    assert plan.backlog_growth == 0
    assert any("--p99" in note for note in plan.notes)  # sized by the mean: says so


def test_p99_is_the_planning_latency_when_given() -> None:
    """200/s * 1.2 s = 240 busy; / 0.7 = 342.86 -> 343; at the mean they are 29 % busy."""
    plan = size(Workload(rate="200/s", latency=0.5, p99=1.2))
    assert plan.planning_latency == 1.2
    assert plan.per_instance == 343
    assert plan.utilization == pytest.approx(100 / 343)


def test_a_p99_below_the_mean_never_sizes_below_the_mean() -> None:
    plan = size(Workload(rate=10, latency=2.0, p99=0.5))
    assert plan.planning_latency == 2.0
    assert plan.per_instance == 29  # 10 * 2 / 0.7 = 28.57
    assert any("below the mean" in note for note in plan.notes)


def test_rates_per_minute_and_per_hour() -> None:
    assert size(Workload(rate="600/m", latency=1, utilization=1)).per_instance == 10
    assert size(Workload(rate="3600/h", latency=7, utilization=1)).per_instance == 7


def test_per_instance_rounds_up() -> None:
    """100 busy / 0.8 = 125 across 3 instances: 41.67 each -> 42 (126 in all)."""
    plan = size(Workload(rate=100, latency=1, utilization="80%", instances=3))
    assert plan.per_instance == 42
    assert plan.total == 126


def test_a_trickle_still_gets_one_worker() -> None:
    plan = size(Workload(rate="1/h", latency=0.01))
    assert plan.per_instance == 1


def test_the_downstream_limit_caps_and_the_queue_grows_when_even_the_mean_exceeds_it() -> None:
    """200/s * 0.5 s = 100 busy at the mean; the downstream takes 50: 100/s served, 100/s queue."""
    plan = size(Workload(rate="200/s", latency=0.5, downstream=50))
    assert plan.wanted == 143
    assert plan.per_instance == 50
    assert plan.capped
    assert plan.capacity == pytest.approx(100)
    assert plan.backlog_growth == pytest.approx(100)
    assert any("grows without bound" in note and "max_queue" in note for note in plan.notes)
    text = "\n".join(plan.explain())
    assert "143 > 50: capped at 50" in text
    assert "the queue grows by 100 tasks/s" in text


def test_a_downstream_limit_between_L_and_N_caps_without_unbounded_growth() -> None:
    """100 busy at the mean, 143 planned, the downstream takes 120: capped, 83 % busy, stable."""
    plan = size(Workload(rate="200/s", latency=0.5, downstream=120))
    assert plan.per_instance == 120
    assert plan.capped
    assert plan.backlog_growth == 0
    assert plan.utilization == pytest.approx(100 / 120)
    assert any("leaves less room than planned" in note for note in plan.notes)


def test_the_downstream_limit_is_shared_by_the_instances() -> None:
    """50 concurrent calls across 4 instances: 50 // 4 = 12 each, never 13 (52 > 50)."""
    plan = size(Workload(rate="200/s", latency=0.5, p99=1.2, downstream=50, instances=4))
    assert plan.per_instance == 12
    assert plan.total == 48


def test_a_downstream_limit_that_is_not_reached_changes_nothing() -> None:
    plan = size(Workload(rate="200/s", latency=0.5, downstream=1000))
    assert plan.per_instance == 143
    assert not plan.capped
    assert "fits" in plan.explain()[5]


def test_max_queue_is_the_arrival_rate_times_the_max_wait() -> None:
    plan = size(Workload(rate="200/s", latency=0.5, max_wait=2))
    assert plan.max_queue == 400


def test_max_queue_drains_at_capacity_when_the_workers_cannot_keep_up() -> None:
    """Capped at 50 workers * 0.5 s = 100/s served: a 2 s wait holds 200, not 400."""
    plan = size(Workload(rate="200/s", latency=0.5, downstream=50, max_wait=2))
    assert plan.max_queue == 200


def test_a_tiny_max_wait_still_allows_one_message() -> None:
    assert size(Workload(rate="1/s", latency=1, max_wait="1ms")).max_queue == 1


def test_utilisation_above_80_percent_is_allowed_with_a_warning() -> None:
    plan = size(Workload(rate=10, latency=1, utilization=0.9))
    assert plan.per_instance == 12  # 10 / 0.9 = 11.1
    assert any("non-linearly" in note for note in plan.notes)


def test_full_utilisation_and_zero_headroom_are_little_s_law_itself() -> None:
    assert size(Workload(rate=10, latency=1, utilization=1)).per_instance == 10
    assert size(Workload(rate=10, latency=1, headroom=0)).per_instance == 10


def test_a_concurrency_beyond_what_a_pool_accepts_says_add_instances() -> None:
    plan = size(Workload(rate="1000000/s", latency=1))
    assert plan.per_instance > 10_000
    assert any("add instances" in note for note in plan.notes)


def test_the_explanation_shows_each_step_in_one_screen() -> None:
    plan = size(Workload(rate="5000/s", p99=0.08, instances=4, headroom=0.2))
    lines = plan.explain()
    assert lines[1:6] == [
        "  rate 5,000/s; W = 0.08 s (by the p99)",
        "1. busy workers: L = 5,000/s * 0.08 s = 400",
        "2. headroom 20 %: N = L * 1.2 = 480",
        "3. per instance: 480 / 4 = 120, rounded up: 120",
        "=> concurrency 120 per instance (4 * 120 = 480 workers)",
    ]
    assert len(lines) <= 24 and all(len(line) <= 100 for line in lines)


def test_the_plan_is_plain_data() -> None:
    data = size(Workload(rate="5000/s", p99=0.08, instances=4, headroom=0.2)).as_dict()
    assert data["per_instance"] == 120
    assert data["total"] == 480
    assert data["workload"]["rate"] == 5000.0


def test_compare_with_a_configured_pool() -> None:
    plan = size(Workload(rate="200/s", latency=0.5, instances=2, max_wait=2))
    lines = compare(plan, "payments", 4, None)
    assert lines[0] == (
        "pool 'payments': concurrency 4 * 2 instance(s) = 8 workers; recommended 72 * 2 = 144"
    )
    assert "raise the pool's concurrency from 4 to 72" in lines[1]
    assert "max_queue: configured none, suggested 400" in lines[2]
    assert compare(plan, "payments", 72, 400)[1:] == ["   max_queue: configured 400, suggested 400"]
    assert "lower" in compare(plan, "payments", 100, None)[1]
    assert "worker_pool='threads'" in compare(plan, "payments", 4, None, "prefork")[-1]
    assert "worker_pool" not in "".join(compare(plan, "payments", 4, None, "threads"))


# -- bad input: every refusal names the input, the value and what is allowed ---------


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        ({"rate": "abc", "latency": 1}, "rate"),
        ({"rate": "0/s", "latency": 1}, "rate"),
        ({"rate": "5/d", "latency": 1}, "rate"),
        ({"rate": 1, "latency": 0}, "latency"),
        ({"rate": 1, "latency": -1}, "latency"),
        ({"rate": 1, "latency": "soon"}, "latency"),
        ({"rate": 1, "latency": float("nan")}, "latency"),
        ({"rate": 1, "latency": 86_401}, "latency"),
        ({"rate": 1, "p99": True}, "p99"),
        ({"rate": 1}, "latency"),
        ({"rate": 1, "latency": 1, "downstream": 0}, "downstream"),
        ({"rate": 1, "latency": 1, "downstream": 2.5}, "downstream"),
        ({"rate": 1, "latency": 1, "downstream": 3, "instances": 4}, "downstream"),
        ({"rate": 1, "latency": 1, "instances": 0}, "instances"),
        ({"rate": 1, "latency": 1, "instances": 10_001}, "instances"),
        ({"rate": 1, "latency": 1, "utilization": 0}, "utilization"),
        ({"rate": 1, "latency": 1, "utilization": "101%"}, "utilization"),
        ({"rate": 1, "latency": 1, "headroom": -0.1}, "headroom"),
        ({"rate": 1, "latency": 1, "headroom": 11}, "headroom"),
        ({"rate": 1, "latency": 1, "headroom": 0.2, "utilization": 0.7}, "headroom"),
        ({"rate": 1, "latency": 1, "max_wait": 0}, "max_wait"),
    ],
)
def test_bad_workloads_are_refused_naming_the_input(settings: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Workload(**settings)
    assert caught.value.setting == setting
    assert "allowed:" in str(caught.value)


def test_parsers_accept_the_documented_spellings() -> None:
    assert parse_seconds("80ms", "p99") == pytest.approx(0.08)
    assert parse_seconds(" 2s ", "latency") == 2.0
    assert parse_seconds(0.5, "latency") == 0.5
    assert parse_fraction("70%", "utilization", high=1, zero=False) == pytest.approx(0.7)
    assert parse_fraction("0", "headroom", high=10, zero=True) == 0
    assert parse_count("12", "instances", 100) == 12
    with pytest.raises(ConfigurationError, match="whole number from 1 to 100"):
        parse_count("1e3", "instances", 100)


# -- a workload from a worker's metrics -------------------------------------------------


def exposition(
    pool: str = "io",
    finished: float = 0,
    buckets: dict[str, float] | None = None,
    total: float = 0.0,
    depth: float | None = 0,
    inflight: float = 0,
) -> str:
    """A worker's /metrics page, as celery_bulkhead.worker.metrics writes it."""
    buckets = buckets or {"0.1": 0, "0.5": 0, "1.0": 0, "+Inf": 0}
    count = buckets["+Inf"]
    lines = [
        "# TYPE celery_bulkhead_concurrency gauge",
        f'celery_bulkhead_concurrency{{pool="{pool}"}} 4.0',
        "# TYPE celery_bulkhead_inflight gauge",
        f'celery_bulkhead_inflight{{pool="{pool}"}} {inflight}',
        "# TYPE celery_bulkhead_tasks counter",
        f'celery_bulkhead_tasks_total{{outcome="succeeded",pool="{pool}"}} {finished - 1}',
        f'celery_bulkhead_tasks_total{{outcome="failed",pool="{pool}"}} 1.0',
        "# TYPE celery_bulkhead_task_duration_seconds histogram",
        *(
            f'celery_bulkhead_task_duration_seconds_bucket{{le="{le}",pool="{pool}"}} {n}'
            for le, n in buckets.items()
        ),
        f'celery_bulkhead_task_duration_seconds_count{{pool="{pool}"}} {count}',
        f'celery_bulkhead_task_duration_seconds_sum{{pool="{pool}"}} {total}',
    ]
    if depth is not None:
        lines += [
            "# TYPE celery_bulkhead_queue_depth gauge",
            f'celery_bulkhead_queue_depth{{pool="{pool}"}} {depth}',
        ]
    return "\n".join(lines) + "\n"


def test_read_metrics_takes_one_pool_s_series() -> None:
    snap = read_metrics(
        exposition(finished=10, buckets={"0.1": 2, "0.5": 9, "1.0": 10, "+Inf": 10}, total=3.0)
    )
    assert snap.pool == "io"
    assert snap.finished == 10  # every outcome counts
    assert snap.duration_count == 10 and snap.duration_sum == 3.0
    assert snap.buckets[0] == (0.1, 2) and snap.buckets[-1] == (float("inf"), 10)
    assert snap.concurrency == 4 and snap.depth == 0


def test_read_metrics_refuses_pages_without_bulkhead_metrics() -> None:
    with pytest.raises(MetricsError, match="no celery-bulkhead pool metrics"):
        read_metrics("# TYPE up gauge\nup 1\n")
    with pytest.raises(MetricsError):
        read_metrics("<html><body>Not found</body></html>")
    with pytest.raises(MetricsError, match="several pools"):
        read_metrics(exposition("a", finished=1) + exposition("b", finished=1))
    assert read_metrics(exposition("a", 1) + exposition("b", 1), "b").pool == "b"
    with pytest.raises(MetricsError, match="no metrics of pool 'c'"):
        read_metrics(exposition("a", finished=1), "c")


def test_quantile_interpolates_like_prometheus() -> None:
    inf = float("inf")
    # 100 tasks: 50 under 0.1 s, 40 in (0.1, 0.5], 10 in (0.5, 1]: rank 99 is 9/10 into the last
    buckets = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (inf, 100.0)]
    assert quantile(0.99, buckets) == pytest.approx(0.5 + 0.5 * 9 / 10)
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    # In +Inf: the highest finite bound (a lower bound of the truth)
    assert quantile(0.99, [(0.1, 1.0), (inf, 10.0)]) == 0.1
    assert quantile(0.99, [(0.1, 0.0), (inf, 0.0)]) is None


def test_observe_counts_arrivals_as_finished_plus_queue_and_in_flight_growth() -> None:
    """In 10 s: 50 finished, the queue grew by 30, in flight by 2: 8.2 arrivals/s."""
    first = read_metrics(
        exposition(
            finished=100,
            depth=10,
            inflight=2,
            total=50.0,
            buckets={"0.1": 0, "0.5": 60, "1.0": 100, "+Inf": 100},
        )
    )
    second = read_metrics(
        exposition(
            finished=150,
            depth=40,
            inflight=4,
            total=75.0,
            buckets={"0.1": 0, "0.5": 80, "1.0": 150, "+Inf": 150},
        )
    )
    seen = observe([first], [second], 10.0)
    assert seen.finished == 50
    assert seen.rate == pytest.approx(8.2)
    assert seen.latency == pytest.approx(0.5)  # (75 - 50) / (150 - 100): the window only
    assert seen.from_window and seen.samples == 50
    # the window's buckets: 20 under 0.5 s, 30 in (0.5, 1]: rank 49.5 -> 0.5 + 0.5 * 29.5 / 30
    assert seen.p99 == pytest.approx(0.5 + 0.5 * 29.5 / 30)
    plan = size(Workload(rate=seen.rate, latency=seen.latency, p99=seen.p99))
    assert plan.per_instance == 12  # 8.2 * 0.99 / 0.7 = 11.6


def test_observe_falls_back_to_latencies_since_start_when_nothing_finished() -> None:
    page = exposition(
        finished=4, total=2.0, depth=0, buckets={"0.1": 0, "0.5": 4, "1.0": 4, "+Inf": 4}
    )
    later = exposition(
        finished=4, total=2.0, depth=5, buckets={"0.1": 0, "0.5": 4, "1.0": 4, "+Inf": 4}
    )
    seen = observe([read_metrics(page)], [read_metrics(later)], 5.0)
    assert seen.rate == pytest.approx(1.0)  # 5 queued in 5 s
    assert not seen.from_window and seen.samples == 4
    assert seen.latency == pytest.approx(0.5)


def test_observe_adds_up_nodes_and_counts_the_shared_queue_once() -> None:
    def node(finished: float, depth: float) -> Snapshot:
        return read_metrics(
            exposition(
                finished=finished,
                depth=depth,
                total=finished * 0.2,
                buckets={"0.1": 0, "0.5": finished, "1.0": finished, "+Inf": finished},
            )
        )

    seen = observe([node(10, 5), node(20, 5)], [node(30, 8), node(40, 8)], 4.0)
    assert seen.finished == 40
    assert seen.rate == pytest.approx((40 + 3) / 4)
    assert seen.concurrency == 8 and seen.nodes == 2


def test_observe_refuses_counters_that_went_backwards() -> None:
    with pytest.raises(MetricsError, match="restarted"):
        observe([read_metrics(exposition(finished=10))], [read_metrics(exposition(finished=2))], 1)
