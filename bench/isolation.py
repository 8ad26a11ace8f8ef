"""Isolation benchmark: does a flooded pool leave another pool's latency alone?

What is measured
----------------
A ``fast`` task (sleeps 10 ms) is submitted at a steady ``--rate`` (20/s) for
``--duration`` seconds (10 s).  Its end-to-end latency is the time from the
submit time carried in its arguments to the completion time the task writes
to Redis, so it includes publish, broker, queue wait, prefetch and the run
itself.  Three cases, each with fresh queues and freshly started workers:

(a) fast alone: ``celery -A isolation_app:bulkhead_app bulkhead worker
    --pool fast`` (threads, concurrency 4); only the fast stream.
(b) bulkhead, beside a flooded slow pool: ``celery ... bulkhead worker``
    runs the fast pool and a ``slow`` pool (threads, concurrency 4) in their
    own workers; ``--slow-burst`` (40) slow tasks, each sleeping 2 s (a hung
    downstream), are submitted just before the fast stream, which is more
    than the slow pool can finish during the stream.
(c) plain Celery: both tasks on one queue, one ``celery worker -P threads
    -c 8`` (the pools' total concurrency, Celery's default prefetch), the
    same slow burst and fast stream.

Every worker runs with ``--without-gossip --without-mingle --without-heartbeat``
and is warmed up (a warm-up task per queue, awaited) before anything is sent.
A round is (a), (b), (c); ``--repeats`` rounds are run and the medians over
rounds are reported, with [min-max].

How to read the ratios
----------------------
``b/a`` is the price the fast pool pays for sharing the machine and broker
with a flooded neighbour when the two are bulkheaded: 1.0 is perfect
isolation; the goal is ``b/a <= 1.2`` at p50 and p99.  What is left above 1.0
is CPU and broker contention (the slow pool's worker, and the producer
publishing the burst, share the 2 cores), not queueing behind slow work.
``c/a`` is what the same load does without bulkheads: fast tasks wait behind
the slow backlog, so it grows with the burst (40 x 2 s / 8 threads = 10 s of
backlog), typically by two to three orders of magnitude.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runner import (
    WORKER_FLAGS,
    BenchError,
    HardLimitExceeded,
    Run,
    base_parser,
    fmt_ms,
    parse_args,
    percentile,
    print_table,
    public_args,
    wait_for,
    write_json,
)
from isolation_app import (
    FAST_CONCURRENCY,
    FAST_TASK,
    PLAIN_CONCURRENCY,
    SLOW_CONCURRENCY,
    SLOW_TASK,
    make_bulkhead_app,
    make_plain_app,
    records_key,
)

FAST_SECONDS = 0.010
SLOW_SECONDS = 2.0
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


@dataclass(frozen=True)
class Case:
    key: str
    title: str
    plain: bool
    flood: bool
    pools: tuple[str, ...]  # bulkhead pools to run (empty: all / plain worker)


CASES = (
    Case("a", "a: fast pool alone (bulkhead)", plain=False, flood=False, pools=("fast",)),
    Case("b", "b: fast beside flooded slow pool (bulkhead)", plain=False, flood=True, pools=()),
    Case("c", "c: plain Celery, one queue, -c 8", plain=True, flood=True, pools=()),
)


@dataclass
class CaseResult:
    case: str
    round: int
    sent: int
    done: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    slow_sent: int
    slow_done_in_window: int
    max_submit_lag_ms: float
    ready_s: float
    stop_s: float
    latencies_ms: list[float] = field(repr=False)


def worker_args(case: Case) -> list[str]:
    if case.plain:
        return [
            "-A",
            "isolation_app:plain_app",
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            str(PLAIN_CONCURRENCY),
            *WORKER_FLAGS,
        ]
    selected = [arg for pool in case.pools for arg in ("--pool", pool)]
    return [
        "-A",
        "isolation_app:bulkhead_app",
        "bulkhead",
        "worker",
        *selected,
        "--",
        *WORKER_FLAGS,
    ]


def run_case(run: Run, case: Case, round_no: int, args: Any) -> CaseResult:
    prefix = run.scope(f"r{round_no}{case.key}")
    factory = make_plain_app if case.plain else make_bulkhead_app
    app = factory(run.broker_url, prefix)
    run.track_app(app)
    fast, slow = app.tasks[FAST_TASK], app.tasks[SLOW_TASK]
    records = run.records
    fast_key, slow_key, warm_key = (records_key(prefix, k) for k in ("fast", "slow", "warm"))

    started = time.monotonic()
    worker = run.start_worker(f"r{round_no}{case.key}", worker_args(case), prefix=prefix)
    try:
        # Ready = every queue's consumer has run a task (the publish also
        # declares the queue, so nothing is lost while the worker boots).
        warm = [fast] if case.pools == ("fast",) else [fast, slow]
        for task in warm:
            task.apply_async(args=(-1, time.time(), 0.0))
        wait_for(
            lambda: records.llen(warm_key) >= len(warm),
            timeout=READY_TIMEOUT,
            what=f"{case.key}: warm-up tasks",
            workers=[worker],
        )
        ready_s = time.monotonic() - started

        slow_sent = args.slow_burst if case.flood else 0
        for seq in range(slow_sent):
            slow.apply_async(args=(seq, time.time(), SLOW_SECONDS))

        n = max(1, round(args.rate * args.duration))
        interval = 1.0 / args.rate
        max_lag = 0.0
        t0 = time.monotonic()
        for seq in range(n):
            delay = t0 + seq * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                max_lag = max(max_lag, -delay)
            fast.apply_async(args=(seq, time.time(), FAST_SECONDS))
        slow_done_in_window = int(records.llen(slow_key))

        # Worst case (c): the last fast task waits for the whole slow backlog.
        backlog = slow_sent * SLOW_SECONDS / min(SLOW_CONCURRENCY, PLAIN_CONCURRENCY)
        wait_for(
            lambda: records.llen(fast_key) >= n,
            timeout=backlog + 30.0,
            what=f"{case.key}: {n} fast tasks",
            interval=0.05,
            workers=[worker],
        )
        entries = [json.loads(raw) for raw in records.lrange(fast_key, 0, -1)]
    finally:
        stop_s = run.stop_worker(worker, timeout=STOP_TIMEOUT)
        app.close()  # the producer's broker connections for this case
        run.cleanup(prefix)

    latencies = [(done_at - submitted_at) * 1000.0 for _, _, submitted_at, done_at in entries]
    return CaseResult(
        case=case.key,
        round=round_no,
        sent=n,
        done=len(entries),
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        max_ms=max(latencies),
        slow_sent=slow_sent,
        slow_done_in_window=slow_done_in_window,
        max_submit_lag_ms=max_lag * 1000.0,
        ready_s=ready_s,
        stop_s=stop_s,
        latencies_ms=[round(x, 3) for x in latencies],
    )


def spread(values: list[float]) -> str:
    return f"{fmt_ms(statistics.median(values))} [{fmt_ms(min(values))}-{fmt_ms(max(values))}]"


def report(results: list[CaseResult], args: Any) -> dict[str, float]:
    by_case = {c.key: [r for r in results if r.case == c.key] for c in CASES}
    rows = []
    for case in CASES:
        rs = by_case[case.key]
        rows.append(
            [
                case.title,
                spread([r.p50_ms for r in rs]),
                spread([r.p99_ms for r in rs]),
                fmt_ms(statistics.median(r.max_ms for r in rs)),
                f"{min(r.done for r in rs)}/{rs[0].sent}",
                f"{statistics.median(r.slow_done_in_window for r in rs):g}/{rs[0].slow_sent}",
                f"{statistics.median(r.ready_s for r in rs):.1f}",
                f"{statistics.median(r.stop_s for r in rs):.1f}",
            ]
        )
    print_table(
        [
            "case",
            "fast p50 ms",
            "fast p99 ms",
            "fast max ms",
            "fast done",
            "slow done in window",
            "ready s",
            "stop s",
        ],
        rows,
        title=(
            f"broker={args.broker}, fast {args.rate:g}/s x {args.duration:g} s "
            f"({FAST_SECONDS * 1000:g} ms tasks), slow burst {args.slow_burst} x "
            f"{SLOW_SECONDS:g} s, {args.repeats} round(s): median [min-max] over rounds"
        ),
    )

    def med(key: str, metric: str) -> float:
        return float(statistics.median(getattr(r, metric) for r in by_case[key]))

    ratios = {
        f"{case}/a {metric}": med(case, f"{metric}_ms") / med("a", f"{metric}_ms")
        for case in ("b", "c")
        for metric in ("p50", "p99")
    }
    print_table(
        ["ratio (of medians)", "p50", "p99"],
        [
            [f"{case}/a", f"{ratios[f'{case}/a p50']:.2f}", f"{ratios[f'{case}/a p99']:.2f}"]
            for case in ("b", "c")
        ],
    )
    ok = ratios["b/a p50"] <= 1.2 and ratios["b/a p99"] <= 1.2
    print(f"\nisolation goal b/a <= 1.2 at p50 and p99: {'met' if ok else 'NOT met'}")
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n", 1)[0])
    parser.add_argument("--rate", type=float, default=20.0, help="fast tasks per second")
    parser.add_argument("--duration", type=float, default=10.0, help="fast stream seconds")
    parser.add_argument("--slow-burst", type=int, default=40, help="slow tasks submitted")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (a), (b), (c)")
    args = parse_args(parser, argv)
    if args.rate <= 0 or args.duration <= 0 or args.slow_burst < 0 or args.repeats < 1:
        parser.error("--rate and --duration must be > 0, --slow-burst >= 0, --repeats >= 1")

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
    per_round = 3 * (args.duration + 25.0) + args.slow_burst * SLOW_SECONDS / PLAIN_CONCURRENCY
    hard_limit = args.hard_limit or 2 * args.repeats * per_round + 60.0
    results: list[CaseResult] = []
    with Run(
        "isolation",
        args.broker_url,
        records_url=args.records_url,
        hard_limit=hard_limit,
        keep_logs=args.keep_logs,
    ) as run:
        print(
            f"isolation bench on {args.broker} at {run.where} (prefix {run.prefix}); fast pool "
            f"{FAST_CONCURRENCY} threads, slow pool {SLOW_CONCURRENCY} threads, plain worker "
            f"{PLAIN_CONCURRENCY} threads; hard limit {hard_limit:.0f} s",
            flush=True,
        )
        started = time.monotonic()
        for round_no in range(args.repeats):
            for case in CASES:
                result = run_case(run, case, round_no, args)
                results.append(result)
                print(
                    f"  round {round_no + 1} {case.key}: p50 {fmt_ms(result.p50_ms)} ms, "
                    f"p99 {fmt_ms(result.p99_ms)} ms, done {result.done}/{result.sent}, "
                    f"slow done in window {result.slow_done_in_window}/{result.slow_sent}, "
                    f"ready {result.ready_s:.1f} s, stop {result.stop_s:.1f} s",
                    flush=True,
                )
        elapsed = time.monotonic() - started
    ratios = report(results, args)
    print(f"total {elapsed:.0f} s")
    if args.json:
        write_json(
            args.json,
            {
                "bench": "isolation",
                "args": public_args(args),
                "settings": {
                    "fast_seconds": FAST_SECONDS,
                    "slow_seconds": SLOW_SECONDS,
                    "fast_concurrency": FAST_CONCURRENCY,
                    "slow_concurrency": SLOW_CONCURRENCY,
                    "plain_concurrency": PLAIN_CONCURRENCY,
                },
                "ratios": ratios,
                "results": [asdict(r) for r in results],
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
