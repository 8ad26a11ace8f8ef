"""Worker drain benchmark: what does the bulkhead worker bootstep cost per task?

What is measured
----------------
``--n`` (5000) no-op tasks and one final ``mark`` task are published into an
empty queue while no worker runs.  Then one worker is started and the
producer polls the queue depth (Redis ``LLEN``; RabbitMQ a passive
``queue.declare``'s message count) every 2 ms.  The drain starts at the
first poll that sees the depth below what was loaded (``t0``, with ``d0``
messages still queued) and ends when ``mark`` -- FIFO, so the last message
taken -- writes its run time to the records Redis.  Reported per measurement:

* **tasks/s until last task done** = ``d0 / (mark time - t0)``, the headline;
* tasks/s until queue empty = ``d0 / (first poll seeing depth 0 - t0)``;
* tasks/s incl. worker boot = ``(n + 1) / (mark time - worker start)``, and
  the boot time itself (worker start to ``t0``).

Two cases, each with fresh queues and a freshly started worker:

(A) plain Celery: an app without celery_bulkhead,
    ``celery -A worker_app:plain_app worker -Q <queue> -P prefork -c 2
    --prefetch-multiplier 4 --without-gossip --without-mingle
    --without-heartbeat``;
(B) celery_bulkhead: the same tasks in pool ``drain`` (its own queue,
    ``prefetch_multiplier=4``, ``acks_late=False``: Celery's defaults), the
    same worker command on ``worker_app:bulkhead_app`` plus ``--bulkhead-pool
    drain --bulkhead-metrics-port <free port>``: the bootstep gives the tasks
    its metered Request class (counting outcomes, durations and queue wait in
    the worker's main process) and serves ``/metrics``.  At the end of every
    B drain ``/metrics`` is scraped and ``celery_bulkhead_tasks_total
    {outcome="succeeded"}`` must equal ``n + 1`` (the no-ops and the mark).

What else differs in B, besides the bootstep: the messages carry one more
header (``bulkhead_published_at``, set at publish; the bootstep reads it for
the queue-wait histogram), and on Redis ``Bulkhead`` sets the transport's
``socket_timeout``/``socket_connect_timeout`` to the publish timeout (10 s),
which does not change how a busy consumer reads.  ``-P``/``-c`` are given
on the command line to both (``--pool``, ``--concurrency``).

First one untimed A and one B drain of ``--warmup`` (1000) tasks warm the
broker and the page cache (the first drain after a broker start is slow on
RabbitMQ).  Then ``--rounds`` (4) rounds of A and B are interleaved, with the
order reversed every other round (A B, B A, A B, ...) so that drift on this
noisy 2-core machine, which the producer, the broker and the worker share,
hits both alike; an even number of rounds lets each go first equally often
(the first drain of a round ran up to 10% slower on RabbitMQ here).  Tables
show the median over rounds [min-max].

How to read the ratio
---------------------
``B/A`` is the bootstep's price in drain throughput for tasks that do
nothing, i.e. the worst case: every microsecond the main process spends per
message shows.  1.0 means free; the goal is ``B/A >= 0.95`` (at most 5%
fewer tasks per second).  Shown are the ratio of the medians and the median
[min-max] of the per-round ratios (A and B of one round ran seconds apart).
Real tasks that take milliseconds dilute the cost accordingly.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runner import (
    WORKER_FLAGS,
    BenchError,
    HardLimitExceeded,
    Run,
    base_parser,
    free_port,
    parse_args,
    print_table,
    public_args,
    wait_for,
    write_json,
)
from celery import Celery
from worker_app import (
    ENV_CONCURRENCY,
    ENV_WORKER_POOL,
    MARK_TASK,
    NOOP_TASK,
    POOL_NAME,
    PREFETCH_MULTIPLIER,
    make_bulkhead_app,
    make_plain_app,
    mark_key,
    queue_name,
)

CASES = {"A": "plain Celery", "B": "celery_bulkhead pool + bootstep"}
START_POLL = 0.002
POLL = 0.005
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
GOAL = 0.95


@dataclass
class Drain:
    case: str
    round: int
    n: int
    preload_s: float
    boot_s: float
    queued_at_start: int
    drain_s: float
    empty_s: float
    total_s: float
    rate_done: float
    rate_empty: float
    rate_boot: float
    stop_s: float
    succeeded: int | None = None
    metrics_ok: bool | None = None


# -- queue depth -------------------------------------------------------------------


class Depth:
    """Ready messages in one queue, read as cheaply as the broker allows."""

    def __init__(self, run: Run, app: Celery, queue: str, prefix: str) -> None:
        self.run = run
        self.queue = queue
        self._conn: Any = None
        if run.broker_redis is not None:
            # kombu's global_keyprefix: the queue's list is "<prefix>:<queue>".
            key = f"{prefix}:{queue}"
            broker = run.broker_redis
            self.read: Callable[[], int] = lambda: int(broker.llen(key))
        else:
            self._conn = app.connection_for_read()
            self._channel: Any = self._conn.channel()
            self.read = self._amqp

    def _amqp(self) -> int:
        ok = self._channel.queue_declare(queue=self.queue, passive=True)
        return int(ok.message_count)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.release()
            self._conn = None


# -- metrics scrape ----------------------------------------------------------------


def succeeded_count(port: int) -> int | None:
    """``celery_bulkhead_tasks_total{pool="drain",outcome="succeeded"}``, or None."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "celery_bulkhead_tasks_total"
                and sample.labels.get("pool") == POOL_NAME
                and sample.labels.get("outcome") == "succeeded"
            ):
                return int(sample.value)
    return None


# -- one drain ---------------------------------------------------------------------


def worker_args(case: str, queue: str, args: Any, port: int | None) -> list[str]:
    argv = [
        "-A",
        "worker_app:plain_app" if case == "A" else "worker_app:bulkhead_app",
        "worker",
        "--queues",
        queue,
        "--pool",
        args.pool,
        "--concurrency",
        str(args.concurrency),
        "--prefetch-multiplier",
        str(PREFETCH_MULTIPLIER),
        "--hostname",
        f"bench-{case}@%h",
        *WORKER_FLAGS,
    ]
    if case == "B":
        argv += ["--bulkhead-pool", POOL_NAME, "--bulkhead-metrics-port", str(port)]
    return argv


def preload(app: Celery, n: int) -> float:
    """Publish ``n`` no-ops and the mark over one producer; return seconds taken."""
    noop, mark = app.tasks[NOOP_TASK], app.tasks[MARK_TASK]
    started = time.monotonic()
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            noop.apply_async(producer=producer)
        mark.apply_async(producer=producer)
    return time.monotonic() - started


def run_drain(run: Run, case: str, round_no: int, args: Any, n: int) -> Drain:
    label = f"r{round_no}{case}" if round_no >= 0 else f"warmup{case}"
    prefix = run.scope(label)
    if case == "A":
        app = make_plain_app(run.broker_url, prefix)
    else:
        app = make_bulkhead_app(
            run.broker_url, prefix, worker_pool=args.pool, concurrency=args.concurrency
        )
    run.track_app(app)
    queue = queue_name(prefix, "plain" if case == "A" else "bulkhead")
    total = n + 1
    records = run.records
    key = mark_key(prefix)
    depth: Depth | None = None
    worker = None
    succeeded: int | None = None
    try:
        preload_s = preload(app, n)
        depth = Depth(run, app, queue, prefix)
        read = depth.read
        wait_for(lambda: read() >= total, timeout=30.0, what=f"{label}: {total} messages queued")
        if read() != total:
            raise BenchError(f"{label}: queue holds {read()} messages, expected {total}")

        port = free_port() if case == "B" else None
        env = {ENV_WORKER_POOL: args.pool, ENV_CONCURRENCY: str(args.concurrency)}
        started = time.monotonic()
        worker = run.start_worker(
            label, worker_args(case, queue, args, port), prefix=prefix, env=env
        )

        # t0: the first poll that sees a message taken.
        deadline = started + BOOT_TIMEOUT
        while True:
            queued = read()
            now_mono, now_wall = time.monotonic(), time.time()
            if queued < total:
                t0_mono, t0_wall, d0 = now_mono, now_wall, queued
                break
            if not worker.alive():
                raise BenchError(f"{label}: worker exited while booting:\n{worker.log_tail()}")
            if now_mono > deadline:
                raise BenchError(f"{label}: worker took no message in {BOOT_TIMEOUT:g} s")
            time.sleep(START_POLL)

        budget = 30.0 + total / 100.0  # far above any drain rate seen here
        empty_wall: float | None = None
        mark_raw: bytes | None = None
        deadline = t0_mono + budget
        while mark_raw is None:
            if empty_wall is None:
                queued = read()
                if queued == 0:
                    empty_wall = time.time()
            mark_raw = records.get(key)
            if mark_raw is not None:
                break
            if not worker.alive():
                raise BenchError(f"{label}: worker exited mid-drain:\n{worker.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{label}: drain not done after {budget:g} s")
            time.sleep(POLL)
        mark_wall = float(mark_raw)
        if empty_wall is None:
            empty_wall = mark_wall  # emptied between two polls: the mark came first
        done_mono = t0_mono + (mark_wall - t0_wall)

        if case == "B":
            assert port is not None
            # The main process counts a success after the child reports it:
            # give the last one (or two) a moment to arrive.
            with contextlib.suppress(BenchError):
                wait_for(
                    lambda: succeeded_count(port) == total,
                    timeout=5.0,
                    interval=0.05,
                    what=f"{label}: metrics to count {total} successes",
                )
            succeeded = succeeded_count(port)
    finally:
        stop_s = run.stop_worker(worker, timeout=STOP_TIMEOUT) if worker is not None else 0.0
        if depth is not None:
            depth.close()
        app.close()
        run.cleanup(prefix)

    drain_s = mark_wall - t0_wall
    empty_s = max(empty_wall - t0_wall, 1e-9)
    total_s = done_mono - started
    return Drain(
        case=case,
        round=round_no,
        n=n,
        preload_s=preload_s,
        boot_s=t0_mono - started,
        queued_at_start=d0,
        drain_s=drain_s,
        empty_s=empty_s,
        total_s=total_s,
        rate_done=d0 / drain_s,
        rate_empty=d0 / empty_s,
        rate_boot=total / total_s,
        stop_s=stop_s,
        succeeded=succeeded,
        metrics_ok=None if case == "A" else succeeded == total,
    )


# -- report ------------------------------------------------------------------------


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    return (
        f"{fmt.format(statistics.median(values))} "
        f"[{fmt.format(min(values))}-{fmt.format(max(values))}]"
    )


def report(results: list[Drain], args: Any) -> dict[str, Any]:
    by_case = {case: [r for r in results if r.case == case] for case in CASES}
    rows = []
    for case, title in CASES.items():
        rs = by_case[case]
        metrics = "-"
        if case == "B":
            counts = [r.succeeded for r in rs]
            ok = sum(1 for r in rs if r.metrics_ok)
            metrics = f"{ok}/{len(rs)} ok ({', '.join(str(c) for c in counts)})"
        rows.append(
            [
                f"{case}: {title}",
                spread([r.rate_done for r in rs]),
                spread([r.rate_empty for r in rs]),
                spread([r.rate_boot for r in rs]),
                spread([r.boot_s for r in rs], "{:.2f}"),
                metrics,
            ]
        )
    print_table(
        [
            "case",
            "tasks/s until last task done",
            "tasks/s until queue empty",
            "tasks/s incl. boot",
            "boot s",
            f"metrics succeeded == {args.n + 1}",
        ],
        rows,
        title=(
            f"broker={args.broker}, -P {args.pool} -c {args.concurrency}, prefetch "
            f"{PREFETCH_MULTIPLIER}, {args.n} no-op tasks + 1 mark, {args.rounds} round(s): "
            "median [min-max] over rounds"
        ),
    )

    def med(case: str, metric: str) -> float:
        return float(statistics.median(getattr(r, metric) for r in by_case[case]))

    paired = {
        metric: [
            b.__dict__[metric] / a.__dict__[metric]
            for a, b in zip(by_case["A"], by_case["B"], strict=True)
        ]
        for metric in ("rate_done", "rate_empty", "rate_boot")
    }
    ratios = {
        metric: {
            "of_medians": med("B", metric) / med("A", metric),
            "per_round_median": statistics.median(paired[metric]),
            "per_round_min": min(paired[metric]),
            "per_round_max": max(paired[metric]),
        }
        for metric in paired
    }
    print_table(
        ["ratio B/A", "of medians", "per round: median [min-max]"],
        [
            [
                label,
                f"{ratios[metric]['of_medians']:.3f}",
                spread(paired[metric], "{:.3f}"),
            ]
            for label, metric in (
                ("until last task done", "rate_done"),
                ("until queue empty", "rate_empty"),
                ("incl. boot", "rate_boot"),
            )
        ],
    )
    headline = ratios["rate_done"]["of_medians"]
    verdict = "met" if headline >= GOAL else "NOT met"
    print(f"\ngoal B/A >= {GOAL} (tasks/s until last task done, of medians): {verdict}")
    return ratios


# -- main --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=5000, help="no-op tasks pre-loaded per drain")
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="rounds of A and B (even: each goes first equally often)",
    )
    parser.add_argument(
        "--pool", choices=("prefork", "threads"), default="prefork", help="worker -P"
    )
    parser.add_argument("--concurrency", type=int, default=2, help="worker -c")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1000,
        help="tasks in one untimed A and B drain first (0: none)",
    )
    args = parse_args(parser, argv)
    if args.n < 1 or args.rounds < 1 or args.concurrency < 1 or args.warmup < 0:
        parser.error("--n, --rounds and --concurrency must be >= 1, --warmup >= 0")
    try:
        return measure(args)
    except HardLimitExceeded as exc:
        print(f"aborted: {exc} (workers stopped, queues deleted)", file=sys.stderr)
        return 3
    except BenchError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (workers stopped, queues deleted)", file=sys.stderr)
        return 130


def measure(args: Any) -> int:
    # Generous: publish at >= 500/s, drain at >= 100/s, plus boot and stop.
    def per_drain(n: int) -> float:
        return 30.0 + n / 500.0 + n / 100.0

    warmup = 2 * per_drain(args.warmup) if args.warmup else 0.0
    hard_limit = args.hard_limit or 2 * args.rounds * per_drain(args.n) + warmup + 60.0
    results: list[Drain] = []
    with Run(
        "worker",
        args.broker_url,
        records_url=args.records_url,
        hard_limit=hard_limit,
        keep_logs=args.keep_logs,
    ) as run:
        print(
            f"worker drain bench on {args.broker} at {run.where} (prefix {run.prefix}); "
            f"-P {args.pool} -c {args.concurrency}, {args.n} no-ops per drain; "
            f"hard limit {hard_limit:.0f} s",
            flush=True,
        )
        started = time.monotonic()
        if args.warmup:
            # Untimed: warms the broker, the page cache and the imports.
            for case in CASES:
                run_drain(run, case, -1, args, args.warmup)
            print(f"  warm-up drains of {args.warmup} tasks done", flush=True)
        for round_no in range(args.rounds):
            order = ("A", "B") if round_no % 2 == 0 else ("B", "A")
            for case in order:
                r = run_drain(run, case, round_no, args, args.n)
                results.append(r)
                extra = ""
                if case == "B":
                    verdict = "ok" if r.metrics_ok else "MISMATCH"
                    extra = f", metrics succeeded {r.succeeded} ({verdict})"
                print(
                    f"  round {round_no + 1} {case}: {r.rate_done:.0f} tasks/s until done, "
                    f"{r.rate_empty:.0f} until empty, {r.rate_boot:.0f} incl. boot "
                    f"(preload {r.preload_s:.1f} s, boot {r.boot_s:.2f} s, "
                    f"drain {r.drain_s:.2f} s, stop {r.stop_s:.1f} s){extra}",
                    flush=True,
                )
        elapsed = time.monotonic() - started
    results.sort(key=lambda r: (r.case, r.round))
    ratios = report(results, args)
    print(f"total {elapsed:.0f} s")
    if args.json:
        write_json(
            args.json,
            {
                "bench": "worker",
                "args": public_args(args),
                "settings": {"prefetch_multiplier": PREFETCH_MULTIPLIER, "goal": GOAL},
                "ratios": ratios,
                "results": [asdict(r) for r in results],
            },
        )
    failed = [r for r in results if r.case == "B" and not r.metrics_ok]
    if failed:
        print(f"metrics check FAILED in {len(failed)} B drain(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
