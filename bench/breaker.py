"""Breaker bench: what does a closed breaker cost a draining pool, and how fast does it recover?

What is measured
----------------
**Drain (closed breaker).**  One app, two pools with identical settings
(``--pool`` prefork, ``--concurrency`` 2, ``prefetch_multiplier=4``,
``acks_late=False``, no cap): ``plain`` without a breaker (A) and
``guarded`` with a default ``Breaker()`` (B), which stays closed.  For each
drain, ``--n`` (3000) no-op tasks and one final ``mark`` task are published
into the pool's empty queue while no worker runs; then one ``celery worker
--bulkhead-pool <pool>`` node is started and the queue depth is polled (Redis
``LLEN``, RabbitMQ a passive ``queue.declare``).  The drain starts at the
first poll that sees a message taken (``t0``, ``d0`` still queued) and ends
when ``mark`` -- FIFO, the last message -- writes its time to Redis; the
rate is ``d0 / (mark - t0)``: worker boot is not in it.  Both nodes run the
bootstep (metered Request class, metrics); B adds only the breaker gate
(``Circuit.before`` before each task, ``Circuit.after`` after it).  One
untimed A and B drain of ``--warmup`` tasks first, then ``--rounds`` (8)
rounds, the order alternating (A B, B A, ...).  Reported: per-round rates,
the ratio of the medians and the per-round ratios.  Goal: ``B/A >= 0.95``.
With ``--rates``, B's breaker also has both rate rules on
(``failure_rate_threshold=50``, ``slow_call_duration=5``): its main process
counts every call in memory and reports the counts with its cache refresh.

On a shared 2-core machine single drains swing by tens of percent, so the
per-round ratios are noisy: the ratio of the medians is the figure to read,
``--control`` (A/A: no breaker on B either) shows the noise floor, and the
in-process cost of the closed path (``Circuit.before`` + ``after``, and the
whole worker gate ``admit`` + ``finished`` around them, timed over 100,000
calls) says what B costs beyond noise, as a share of A's time per task.

**Recovery.**  Pool ``recover`` (``Breaker(reset_timeout=--reset,
fail_max=5)``, defaults otherwise: ``cache_seconds=1``, ``on_open="defer"``),
one node of ``--concurrency`` processes, its task calling a local HTTP
downstream (10 ms per call).  A producer publishes ``--rate`` (100) tasks/s
throughout.  After 2 s of warm-up and 3 s of baseline, the downstream
answers 500 for ``--outage`` (5) seconds, then 200 again.  From the
downstream's own log (one line per call): the calls that reached it while it
was down; from recovery, the time to the first successful call (the trial),
to the breaker's Redis record saying closed, to the first second in which
the pool completes at least 90% of the offered rate again ("full rate"),
and until every task published before recovery has been called (the
deferred backlog drained).

Usage::

    python bench/breaker.py [--broker redis|rabbitmq|URL] [--n 3000] [--rounds 8] [--control]
                            [--rates]

Standalone: it needs the repository's virtualenv, Redis on 127.0.0.1:6379
(records and breaker state, db 9, keys under a prefix of its own, deleted at
the end) and the broker.  This file is also the workers' app module
(``celery -A breaker:app``), configured from ``BENCH_BREAKER_*`` variables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from kombu import Connection

from celery_bulkhead import Breaker, Bulkhead, Pool

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

STATE_URL = "redis://127.0.0.1:6379/9"
BROKERS = {"redis": "redis://127.0.0.1:6379/9", "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//"}
WORKER_FLAGS = ["--without-gossip", "--without-mingle", "--without-heartbeat"]
GOAL = 0.95
CALL_TIME = 0.01  # the healthy downstream's answer time


# -- the app (the workers import this module) ---------------------------------------------


#: The rate rules of ``--rates`` (B's breaker, closed all along: no call fails or is slow).
RATES: dict[str, Any] = {"failure_rate_threshold": 50, "slow_call_duration": 5}


def make_app(
    broker: str, prefix: str, reset: float = 2.0, control: bool = False, rates: bool = False
) -> Celery:
    app = Celery("bench_breaker", broker=broker, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        task_default_queue=f"{prefix}.default",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        bulkhead_state_url=STATE_URL,
    )
    same = {"prefetch_multiplier": 4, "acks_late": False, "drain_timeout": 2.0}
    Bulkhead(
        app,
        pools=[
            Pool("plain", queue=f"{prefix}.plain", **same),
            Pool(
                "guarded",
                queue=f"{prefix}.guarded",
                breaker=None if control else Breaker(name=prefix, **(RATES if rates else {})),
                **same,
            ),
            Pool(
                "recover",
                queue=f"{prefix}.recover",
                breaker=Breaker(name=f"{prefix}-recover", fail_max=5, reset_timeout=reset),
                **same,
            ),
        ],
    )
    records = redis.Redis.from_url(STATE_URL)
    downstream = os.environ.get("BENCH_BREAKER_DOWNSTREAM", "http://127.0.0.1:9/")

    for pool in ("plain", "guarded"):

        @app.task(name=f"bench.{pool}.noop", bulkhead=pool, shared=False)
        def noop() -> None:
            """Nothing at all: every microsecond of the worker's own shows."""

        @app.task(name=f"bench.{pool}.mark", bulkhead=pool, shared=False)
        def mark(key: str) -> None:
            records.set(key, repr(time.time()), ex=600)

    @app.task(name="bench.recover.call", bulkhead="recover", shared=False)
    def call(i: int) -> None:
        with urllib.request.urlopen(f"{downstream}?i={i}", timeout=10) as response:
            response.read()

    return app


app = make_app(
    os.environ.get("BENCH_BREAKER_BROKER", BROKERS["redis"]),
    os.environ.get("BENCH_BREAKER_PREFIX", "bench-breaker"),
    float(os.environ.get("BENCH_BREAKER_RESET", "2")),
    os.environ.get("BENCH_BREAKER_CONTROL") == "1",
    os.environ.get("BENCH_BREAKER_RATES") == "1",
)


# -- processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Worker:
    """One ``celery -A breaker:app worker --bulkhead-pool <pool>`` node."""

    def __init__(self, args: Any, prefix: str, pool: str, env: dict[str, str]) -> None:
        self.log = Path(f"/tmp/bench-breaker-{prefix}-{pool}-{uuid.uuid4().hex[:4]}.log")
        command = [
            sys.executable,
            *("-m", "celery", "-A", "breaker:app", "worker"),
            *("--queues", f"{prefix}.{pool}", "--pool", args.pool),
            *("--concurrency", str(args.concurrency), "--prefetch-multiplier", "4"),
            *("--hostname", f"{pool}-{uuid.uuid4().hex[:4]}@%h", "--bulkhead-pool", pool),
            *("--loglevel", "WARNING", *WORKER_FLAGS),
        ]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=HERE,
                env={**os.environ, "PYTHONPATH": f"{HERE}:{ROOT}", **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log.unlink(missing_ok=True)


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class Depth:
    """Ready messages in one queue, as cheaply as the broker allows."""

    def __init__(self, broker: str, queue: str) -> None:
        self.queue = queue
        self.conn: Any = None
        if broker.startswith("redis"):
            client = redis.Redis.from_url(broker)
            self.read = lambda: int(client.llen(queue))
        else:
            self.conn = Connection(broker)
            channel = self.conn.channel()
            self.read = lambda: int(channel.queue_declare(queue=queue, passive=True).message_count)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.release()


# -- the drain ---------------------------------------------------------------------------


def drain(args: Any, broker: str, prefix: str, pool: str, n: int) -> float:
    """Tasks per second while one fresh node drains ``n`` queued no-ops of ``pool``."""
    producer_app = make_app(broker, prefix, control=args.control, rates=args.rates)
    records = redis.Redis.from_url(STATE_URL)
    key = f"{prefix}:mark:{uuid.uuid4().hex[:6]}"
    noop, mark = producer_app.tasks[f"bench.{pool}.noop"], producer_app.tasks[f"bench.{pool}.mark"]
    with producer_app.producer_or_acquire() as producer:
        for _ in range(n):
            noop.apply_async(producer=producer)
        mark.apply_async((key,), producer=producer)
    depth = Depth(broker, f"{prefix}.{pool}")
    total = n + 1
    wait_for(lambda: depth.read() >= total, 30, f"{total} messages queued")
    env = {
        "BENCH_BREAKER_BROKER": broker,
        "BENCH_BREAKER_PREFIX": prefix,
        "BENCH_BREAKER_CONTROL": "1" if args.control else "0",
        "BENCH_BREAKER_RATES": "1" if args.rates else "0",
    }
    worker = Worker(args, prefix, pool, env)
    try:
        while (queued := depth.read()) >= total:
            if not worker.alive():
                raise SystemExit(f"the {pool} worker exited:\n{worker.log.read_text()[-3000:]}")
            time.sleep(0.002)
        t0, d0 = time.time(), queued
        # The mark carries its own time: poll gently, not to steal the drain's CPU.
        raw = wait_for(lambda: records.get(key), 60 + n / 100, "the mark", interval=0.05)
        return d0 / (float(raw) - t0)
    finally:
        worker.stop()
        depth.close()
        producer_app.close()
        records.delete(key)


class _Request:
    """Just what the gate reads and writes on a Celery request."""

    bulkhead_trial: str | None = None
    bulkhead_exc: BaseException | None = None
    bulkhead_tenant: str | None = None
    bulkhead_spent = False

    def __init__(self) -> None:
        self.request_dict = {"id": "cost", "task": "bench.guarded.noop"}


def closed_path_cost(calls: int = 100_000, rates: bool = False) -> tuple[float, float]:
    """Seconds per task on a closed breaker: ``Circuit`` alone, and the whole gate.

    In process, on the in-memory store: the circuit's ``before()`` +
    ``after()``, and the worker gate's ``admit()`` + ``finished()`` around
    them (what the node's main process runs per task), free of the machine's
    noise.
    """
    from celery_bulkhead.breaker import Circuit
    from celery_bulkhead.breaker.memory import MemoryBreakerStore
    from celery_bulkhead.worker.gate import WorkerGate

    breaker = Breaker(**(RATES if rates else {}))
    circuit = Circuit("cost", breaker, MemoryBreakerStore(), lease=60.0)
    before, after = circuit.before, circuit.after
    started = time.perf_counter()
    for _ in range(calls):
        verdict = before()
        after(verdict.token, None, 0.001)
    alone = (time.perf_counter() - started) / calls

    cost_app = make_app("memory://", "cost")
    pool = Pool("guarded", queue="cost.guarded", breaker=replace(breaker, name="cost"))
    gate = WorkerGate(cost_app, pool, None, None, circuit)
    admit, finished = gate.admit, gate.finished
    started = time.perf_counter()
    for _ in range(calls):
        request = _Request()
        admit(request)
        finished(request, "succeeded", 0.001, True)
    whole = (time.perf_counter() - started) / calls
    started = time.perf_counter()
    for _ in range(calls):
        _Request()
    whole -= (time.perf_counter() - started) / calls  # not the fake request's own cost
    cost_app.close()
    return alone, whole


def run_drains(args: Any, broker: str, prefix: str) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {"plain": [], "guarded": []}
    for pool in ("plain", "guarded"):
        drain(args, broker, prefix, pool, args.warmup)
    for round_no in range(args.rounds):
        order = ("plain", "guarded") if round_no % 2 == 0 else ("guarded", "plain")
        for pool in order:
            rates[pool].append(drain(args, broker, prefix, pool, args.n))
        a, b = rates["plain"][-1], rates["guarded"][-1]
        print(f"  round {round_no + 1}: A {a:7.0f}/s  B {b:7.0f}/s  B/A {b / a:.3f}", flush=True)
    return rates


# -- recovery ------------------------------------------------------------------------------


class Downstream:
    """200 after ``CALL_TIME``, or 500 at once while ``failing``; logs every call."""

    def __init__(self) -> None:
        self.failing = False
        #: (time, status, the task's number)
        self.calls: list[tuple[float, int, int]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                failing = owner.failing
                if not failing:
                    time.sleep(CALL_TIME)
                number = int(self.path.partition("i=")[2] or -1)
                owner.calls.append((time.monotonic(), 500 if failing else 200, number))
                with contextlib.suppress(OSError):
                    self.send_response(500 if failing else 200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ok_between(self, start: float, end: float) -> int:
        return sum(1 for at, status, _ in list(self.calls) if status == 200 and start <= at < end)


def recovery(args: Any, broker: str, prefix: str) -> dict[str, float]:
    down = Downstream()
    producer_app = make_app(broker, prefix, args.reset)
    call = producer_app.tasks["bench.recover.call"]
    state = redis.Redis.from_url(STATE_URL)
    record = f"bulkhead:{{breaker:{prefix}-recover}}:state"
    worker = Worker(
        args,
        prefix,
        "recover",
        {
            "BENCH_BREAKER_BROKER": broker,
            "BENCH_BREAKER_PREFIX": prefix,
            "BENCH_BREAKER_DOWNSTREAM": down.url,
            "BENCH_BREAKER_RESET": str(args.reset),
        },
    )
    published = [0]
    stop = threading.Event()

    def produce() -> None:
        with producer_app.producer_or_acquire() as producer:
            next_at = time.monotonic()
            while not stop.is_set():
                call.apply_async((published[0],), producer=producer)
                published[0] += 1
                next_at += 1 / args.rate
                time.sleep(max(0.0, next_at - time.monotonic()))

    try:
        producing = threading.Thread(target=produce, daemon=True)
        call.delay(-1)
        wait_for(lambda: down.calls, 60, "the worker to call the downstream", interval=0.05)
        producing.start()
        time.sleep(2.0)
        base_start = time.monotonic()
        time.sleep(3.0)
        baseline = down.ok_between(base_start, base_start + 3.0) / 3.0
        down.failing = True
        failed_from = time.monotonic()
        time.sleep(args.outage)
        down.failing = False
        recovered = time.monotonic()
        backlog = published[0]  # tasks published before recovery
        dead_calls = sum(1 for at, s, _ in list(down.calls) if s == 500 and at >= failed_from)
        closed_at = wait_for(
            lambda: state.hget(record, "state") == b"closed" and time.monotonic(),
            60,
            "the breaker to close",
        )

        def backlog_called() -> float | bool:
            called = {i for _, _, i in list(down.calls)}
            return all(i in called for i in range(backlog)) and time.monotonic()

        drained_at = wait_for(backlog_called, 120, "the backlog", 0.05)
        time.sleep(max(0.0, recovered + 10 - time.monotonic()))
        stop.set()
        producing.join(timeout=10)
        oks = sorted(at for at, s, _ in list(down.calls) if s == 200 and at >= recovered)
        full = next(
            (at for at in oks if down.ok_between(at, at + 1.0) >= 0.9 * args.rate), math.nan
        )
        return {
            "baseline": baseline,
            "dead_calls": dead_calls,
            "first_ok": (oks[0] - recovered) if oks else math.nan,
            "closed": closed_at - recovered,
            "full": full - recovered,
            "drained": drained_at - recovered,
            "backlog": backlog,
        }
    finally:
        stop.set()
        worker.stop()
        producer_app.close()
        down.server.shutdown()
        state.delete(record)


# -- main ----------------------------------------------------------------------------------


def cleanup(broker: str, prefix: str) -> None:
    with Connection(broker) as conn:
        for suffix in ("plain", "guarded", "recover", "default"):
            with conn.channel() as channel, contextlib.suppress(conn.channel_errors):
                channel.queue_delete(f"{prefix}.{suffix}")
            if broker.startswith("amqp"):
                with conn.channel() as channel, contextlib.suppress(conn.channel_errors):
                    channel.exchange_delete(f"{prefix}.{suffix}")
    # Key deletion, never a flush: on Redis a queue_delete from a fresh connection
    # leaves the lists and bindings behind; every key naming the prefix goes
    # (queues, bindings, marks, breaker state).
    for url in {STATE_URL, broker} if broker.startswith("redis") else {STATE_URL}:
        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", default="redis", help="redis, rabbitmq or a broker URL")
    parser.add_argument("--n", type=int, default=3000, help="no-op tasks per drain")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--pool", default="prefork")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--reset", type=float, default=2.0, help="reset_timeout (recovery)")
    parser.add_argument("--rate", type=float, default=100.0, help="tasks/s (recovery)")
    parser.add_argument("--outage", type=float, default=5.0, help="seconds down (recovery)")
    parser.add_argument(
        "--control",
        action="store_true",
        help="A/A: no breaker on B either, to see the noise floor of the ratio",
    )
    parser.add_argument(
        "--rates",
        action="store_true",
        help="B's breaker with the rate rules on (failure_rate_threshold, slow_call_duration)",
    )
    parser.add_argument("--skip-drain", action="store_true")
    parser.add_argument("--skip-recovery", action="store_true")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    broker = BROKERS.get(args.broker, args.broker)
    prefix = f"bbrk{uuid.uuid4().hex[:8]}"
    print(
        f"breaker bench: broker {broker.split('@')[-1]}, -P {args.pool} -c {args.concurrency}, "
        f"n={args.n}, rounds={args.rounds}",
        flush=True,
    )
    results: dict[str, Any] = {}
    try:
        if not args.skip_drain:
            b_is = "the same (control: no breaker)" if args.control else "closed Breaker()"
            if args.rates and not args.control:
                b_is = f"closed Breaker({', '.join(f'{k}={v}' for k, v in RATES.items())})"
            print(f"drain of no-op tasks, A = pool without a breaker, B = {b_is}:")
            rates = run_drains(args, broker, prefix)
            a, b = statistics.median(rates["plain"]), statistics.median(rates["guarded"])
            ratios = [y / x for x, y in zip(rates["plain"], rates["guarded"], strict=True)]
            verdict = "ok" if b / a >= GOAL else "BELOW GOAL"
            print(
                f"  median: A {a:.0f}/s, B {b:.0f}/s; B/A of medians {b / a:.3f} "
                f"(goal >= {GOAL}: {verdict}); per-round B/A median "
                f"{statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]",
                flush=True,
            )
            alone, cost = closed_path_cost(rates=args.rates)
            print(
                f"  closed path in process: Circuit.before() + after() {alone * 1e6:.2f} us, "
                f"the whole gate (admit() + finished()) {cost * 1e6:.2f} us per task: "
                f"{cost * a:.2%} of A's time per task ({1e6 / a:.0f} us)",
                flush=True,
            )
            results["drain"] = {
                "A": rates["plain"],
                "B": rates["guarded"],
                "ratio": b / a,
                "circuit_seconds": alone,
                "gate_seconds": cost,
            }
        if not args.skip_recovery:
            print(
                f"recovery: {args.rate:.0f} tasks/s offered, downstream down {args.outage:g} s, "
                f"reset_timeout={args.reset:g} s, cache_seconds=1, -c {args.concurrency}:",
                flush=True,
            )
            r = recovery(args, broker, prefix)
            print(
                f"  baseline {r['baseline']:.0f} calls/s; calls to the dead downstream "
                f"{r['dead_calls']:.0f} (of ~{args.rate * args.outage:.0f} tasks offered)\n"
                f"  from recovery: first successful call (trial) {r['first_ok']:.2f} s, "
                f"breaker closed {r['closed']:.2f} s, back at full rate {r['full']:.2f} s, "
                f"every task published before recovery called {r['drained']:.2f} s "
                f"({r['backlog']:.0f} tasks)",
                flush=True,
            )
            results["recovery"] = r
    finally:
        cleanup(broker, prefix)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
