"""Tenant-limit benchmark: is a flooding tenant held to its budget, are the others untouched,
and what does a tenant limit cost a publish?

What is measured (no worker runs; nothing consumes; every measurement uses
queues and a pool name of its own, deleted afterwards)
----------------------------------------------------------------------------

1. **Isolation** (``--seconds``, 6 s a measurement).  A pool limited per
   tenant (``rate=--rate`` (5/s), ``burst=--burst`` (10), reject at the
   limit, ``max_queue`` far above the load) gets, from producer processes
   started together at a barrier:

   * ``alone``: 50 quiet tenants (``--quiet``), published round-robin by one
     process at a paced total of ``quiet x rate / 2`` per second (each quiet
     tenant at half its rate: never limited; 125/s in all by default, well
     within what one producer process publishes, so a shortfall is
     interference, not a saturated producer);
   * ``beside``: the same quiet load, and one noisy tenant published by a
     second process at 20x its rate (``--factor``).

   For the noisy tenant: admitted against the model ``burst + rate x
   elapsed`` (elapsed from its first publish to its last).  For the quiet
   tenants: their throughput (admitted publishes per second over the
   measurement) ``beside`` / ``alone``: the goal is >= 0.95.  Nothing
   admitted may be lost and no quiet publish may be refused: the queue depth
   is checked against the admitted count after every measurement.

2. **Publish cost** (``--n`` (3000) timed calls of each kind a round, one
   thread, after ``--warmup`` (200) untimed ones), as ``bench/publish.py``
   does it, except that the kinds take turns within a round: ``--slices``
   (20) slices of ``n / slices`` calls each, in an order reversed every
   slice, so load from elsewhere on a shared machine falls on all alike:

   * ``plain``: plain Celery ``apply_async`` (Redis: one LPUSH; RabbitMQ:
     ``basic.publish`` without confirms);
   * ``plain-confirm`` (RabbitMQ only): plain Celery with
     ``confirm_publish=True``, the fair baseline for a capped pool, which
     waits for the broker's confirm;
   * ``capped``: the same task in a capped pool (``max_queue``) without a
     tenant limit, to tell the cap's cost from the tenant limit's;
   * ``tenant``: the same task in a capped pool with a tenant limit that is
     never reached (tenants round-robin over 50 ids).  On Redis whose state
     lives in the broker's Redis, bucket, cap and push are one Lua call; on
     RabbitMQ the bucket is one call to the Redis state store, then a
     confirmed publish.

   * ``confirm+ping`` (RabbitMQ only): ``plain-confirm`` followed by one bare
     ``PING`` to the state Redis over a socket held open: the cheapest round
     trip there is.  ``confirm+ping / plain-confirm`` is the most that any
     design making one Redis call per publish (as the tenant limit does on
     RabbitMQ) can reach on this machine.

   Goal: ``tenant / plain`` publishes per second >= 0.95 on Redis (0.90 at
   the least); on RabbitMQ ``tenant / plain-confirm``.

Every round runs each measurement once, in an order reversed every other
round (``--rounds``, 6, must be even), so drift on a noisy machine hits A and
B alike.  Reported: medians over rounds [min-max], and the median of the
per-round ratios; for the publish cost also the producer's own CPU time per
publish, which a busy machine disturbs less than wall-clock throughput.

Usage::

    python bench/tenants.py --broker redis
    python bench/tenants.py --broker rabbitmq      # tenant state: --state (Redis)

Standalone: needs celery_bulkhead importable (run from the repository root
with its virtualenv) and the brokers on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
from celery import Celery
from kombu import Connection

from celery_bulkhead import Bulkhead, Pool, TenantLimit, TenantLimited
from celery_bulkhead.bulkhead import installed_on

BROKERS = {
    "redis": "redis://127.0.0.1:6379/12",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
}
DEFAULT_STATE = "redis://127.0.0.1:6379/12"
TASK = "bench.tenants.noop"
CAP = 10_000_000
QUIET_GOAL = 0.95
REDIS_GOAL, REDIS_FLOOR = 0.95, 0.90
#: Tenants of the publish-cost measurement, round-robin (never limited).
COST_TENANTS = 50


# -- apps ----------------------------------------------------------------------


def _settings(prefix: str, state_url: str, confirm: bool = False) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": f"{prefix}.plain",
        "task_default_exchange": f"{prefix}.plain",
        "task_default_routing_key": f"{prefix}.plain",
        "broker_connection_retry_on_startup": True,
        "bulkhead_state_url": state_url,
    }
    if confirm:
        settings["broker_transport_options"] = {"confirm_publish": True}
    return settings


def plain_app(broker: str, prefix: str, state_url: str, confirm: bool = False) -> Celery:
    """No celery_bulkhead: Celery's own publish to ``<prefix>.plain``."""
    app = Celery("bench_tenants_plain", broker=broker, set_as_current=False)
    app.conf.update(_settings(prefix, state_url, confirm))

    @app.task(name=TASK, shared=False)
    def noop(tenant: str = "") -> None:
        """Never runs: only its publish is measured."""

    return app


def tenant_app(
    broker: str, prefix: str, state_url: str, pool: str, rate: float | None, burst: int
) -> Celery:
    """The task in a capped pool ``pool`` (queue ``<prefix>.tenant``) limited per tenant.

    ``rate=None``: the same capped pool without a tenant limit.
    """
    app = Celery("bench_tenants_limited", broker=broker, set_as_current=False)
    app.conf.update(_settings(prefix, state_url))
    limit = None
    if rate is not None:
        limit = TenantLimit("tenant", rate=rate, burst=burst, on_limited="reject")
    Bulkhead(app, pools=[Pool(pool, queue=f"{prefix}.tenant", max_queue=CAP, tenant=limit)])

    @app.task(name=TASK, shared=False, bulkhead=pool)
    def noop(tenant: str = "") -> None:
        """Never runs: only its publish is measured."""

    return app


# -- cleanup ----------------------------------------------------------------------


@dataclass
class Scope:
    """One measurement's names: queues ``<prefix>.*`` and the pool's tenant keys."""

    broker: str
    state_url: str
    prefix: str
    pool: str = field(default_factory=lambda: f"bt{secrets.token_hex(5)}")

    def depth(self, queue: str) -> int:
        with Connection(self.broker) as conn, conn.channel() as channel:
            if conn.transport.driver_type == "redis":
                return int(channel.client.llen(f"{self.prefix}.{queue}"))
            try:
                answer = channel.queue_declare(queue=f"{self.prefix}.{queue}", passive=True)
            except conn.channel_errors:
                return 0
            return int(answer.message_count)

    def cleanup(self) -> None:
        names = [f"{self.prefix}.{kind}" for kind in ("plain", "tenant", "tenant.continue")]
        if self.broker.startswith("redis"):
            client = redis.Redis.from_url(self.broker)
            keys = [
                *client.scan_iter(match=f"{self.prefix}.*", count=1000),
                *client.scan_iter(match=f"_kombu.binding.{self.prefix}.*", count=1000),
            ]
            if keys:
                client.delete(*keys)
            client.close()
        else:
            with Connection(self.broker) as conn:
                for name in names:
                    for delete in ("queue_delete", "exchange_delete"):
                        with conn.channel() as channel, contextlib.suppress(*conn.channel_errors):
                            getattr(channel, delete)(name)
        state = redis.Redis.from_url(self.state_url)
        keys = list(state.scan_iter(match=f"bulkhead:{{{self.pool}*", count=1000))
        if keys:
            state.delete(*keys)
        state.close()


@contextlib.contextmanager
def scoped(args: Any, run: str, label: str) -> Iterator[Scope]:
    scope = Scope(args.broker_url, args.state, f"{run}.{label}")
    try:
        yield scope
    finally:
        scope.cleanup()


# -- isolation: producer processes -------------------------------------------------------


@dataclass
class Report:
    """What one producer process did during the measurement."""

    role: str
    admitted: int = 0
    refused: int = 0
    errors: int = 0
    first_start: float = 0.0
    last_end: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, admitted publishes
    error: str = ""


def produce(
    role: str,
    app_args: tuple[Any, ...],
    tenants: list[str],
    per_second: float,
    seconds: float,
    barrier: Any,
    results: Any,
) -> None:
    """One producer process: publish ``tenants`` round-robin at ``per_second``, paced."""
    report = Report(role)
    try:
        try:
            app = tenant_app(*app_args)
            task = app.tasks[TASK]
            task.delay(tenant=f"warm-up-{role}")  # connected, declared, scripts loaded
        except BaseException:
            barrier.abort()
            raise
        barrier.wait(timeout=120)
        every = 1.0 / per_second
        clock = time.perf_counter
        started = clock()
        report.first_start = started
        until = started + seconds
        n = 0
        while (now := clock()) < until:
            due = started + n * every
            if due > now:
                time.sleep(due - now)  # pacing the offered load
            before = clock()
            try:
                task.delay(tenant=tenants[n % len(tenants)])
            except TenantLimited:
                report.refused += 1
            except Exception:
                report.errors += 1
            else:
                report.admitted += 1
                report.latencies.append(clock() - before)
            report.last_end = clock()
            n += 1
        report.last_end = clock()
    except BaseException as exc:  # reported, never hidden
        report.error = f"{type(exc).__name__}: {exc}"
    finally:
        results.put(report)


@dataclass
class Isolation:
    kind: str  # "alone" or "beside"
    round: int
    quiet_per_s: float
    quiet_refused: int
    quiet_p50_ms: float
    quiet_p99_ms: float
    noisy_admitted: int = 0
    noisy_offered: int = 0
    noisy_model: float = 0.0


def run_isolation(args: Any, run: str, kind: str, round_no: int) -> Isolation:
    context = multiprocessing.get_context("spawn")
    with scoped(args, run, f"r{round_no}{kind}") as scope:
        app_args = (args.broker_url, scope.prefix, args.state, scope.pool, args.rate, args.burst)
        quiet = [f"quiet-{i}" for i in range(args.quiet)]
        roles = [("quiet", quiet, args.quiet * args.rate / 2)]
        if kind == "beside":
            roles.append(("noisy", ["noisy"], args.factor * args.rate))
        barrier = context.Barrier(len(roles))
        results = context.Queue()
        processes = [
            context.Process(
                target=produce,
                args=(role, app_args, tenants, rate, args.seconds, barrier, results),
                daemon=True,
            )
            for role, tenants, rate in roles
        ]
        for process in processes:
            process.start()
        try:
            reports = {r.role: r for r in (results.get(timeout=180) for _ in processes)}
        finally:
            for process in processes:
                process.join(timeout=30)
                if process.is_alive():
                    process.kill()
        for report in reports.values():
            if report.error or report.errors:
                raise SystemExit(f"{kind}: producer {report.role} failed: {report.error}")
        admitted = sum(r.admitted for r in reports.values()) + len(reports)  # and warm-ups
        deadline = time.monotonic() + 30
        while (depth := scope.depth("tenant")) != admitted and time.monotonic() < deadline:
            time.sleep(0.1)
        if depth != admitted:
            raise SystemExit(f"{kind}: {depth} messages in the queue, {admitted} admitted")
        q = reports["quiet"]
        lat = sorted(q.latencies) or [0.0]
        result = Isolation(
            kind,
            round_no,
            quiet_per_s=q.admitted / args.seconds,
            quiet_refused=q.refused,
            quiet_p50_ms=1000 * percentile(lat, 50),
            quiet_p99_ms=1000 * percentile(lat, 99),
        )
        if "noisy" in reports:
            noisy = reports["noisy"]
            result.noisy_admitted = noisy.admitted
            result.noisy_offered = noisy.admitted + noisy.refused
            result.noisy_model = args.burst + args.rate * (noisy.last_end - noisy.first_start)
        return result


# -- publish cost ---------------------------------------------------------------------


@dataclass
class Cost:
    kind: str
    round: int
    per_s: float
    p50_us: float
    p99_us: float
    cpu_us: float  # the producer's own CPU time per publish (steadier on a busy machine)


def _cost_app(args: Any, scope: Scope, kind: str) -> tuple[Celery, str]:
    if kind in ("tenant", "capped"):
        rate = 1_000_000 if kind == "tenant" else None  # never reached: all admitted
        return tenant_app(
            args.broker_url, scope.prefix, args.state, scope.pool, rate, 1_000_000
        ), "tenant"
    confirm = kind in ("plain-confirm", "confirm+ping")
    return plain_app(args.broker_url, scope.prefix, args.state, confirm), "plain"


_PING = b"*1\r\n$4\r\nPING\r\n"


def _pinger(state_url: str) -> Callable[[], None]:
    """One bare PING round trip to the state Redis, on a connection held open."""
    conn = redis.Redis.from_url(state_url).connection_pool.make_connection()
    conn.connect()  # auth and db from the URL
    sock = conn._sock

    def ping() -> None:
        assert conn._sock is sock  # held: the connection closes its socket when collected
        sock.sendall(_PING)
        if sock.recv(64) != b"+PONG\r\n":
            raise SystemExit("confirm+ping: the state Redis did not answer PONG")

    return ping


@dataclass
class _Timed:
    """One kind's app and what its timed calls took, summed over the round's slices."""

    scope: Scope
    app: Celery
    queue: str
    after: Callable[[], None] | None = None  # confirm+ping: the round trip after each publish
    latencies: list[int] = field(default_factory=list)  # ns per call
    seconds: float = 0.0
    cpu: float = 0.0


def run_cost_round(args: Any, run: str, kinds: Sequence[str], round_no: int) -> list[Cost]:
    """Every kind's ``--n`` calls, in ``--slices`` slices taken in turn (ABCCBA...).

    The kinds take turns every ``n / slices`` calls, so a burst of load from
    elsewhere on the machine falls on all of them alike instead of on
    whichever ran at that moment.
    """
    tenants = [{"tenant": f"t{i}"} for i in range(COST_TENANTS)]
    clock = time.perf_counter_ns
    with contextlib.ExitStack() as stack:
        timed: dict[str, _Timed] = {}
        for kind in kinds:
            scope = stack.enter_context(scoped(args, run, f"r{round_no}{kind}"))
            app, queue = _cost_app(args, scope, kind)
            stack.callback(app.close)
            timed[kind] = _Timed(scope, app, queue)
            if kind == "confirm+ping":
                timed[kind].after = _pinger(args.state)
            apply_async = app.tasks[TASK].apply_async
            for i in range(args.warmup):
                apply_async(kwargs=tenants[i % COST_TENANTS])
        size = max(1, args.n // args.slices)
        gc.collect()
        for piece in range(args.slices):
            flip = (piece + round_no) % 2
            for kind in tuple(reversed(kinds)) if flip else kinds:
                one = timed[kind]
                apply_async = one.app.tasks[TASK].apply_async
                after = one.after
                latencies = [0] * size
                cpu = time.process_time()
                started = clock()
                for i in range(size):
                    before = clock()
                    apply_async(kwargs=tenants[i % COST_TENANTS])
                    if after is not None:
                        after()
                    latencies[i] = clock() - before
                one.seconds += (clock() - started) / 1e9
                one.cpu += time.process_time() - cpu
                one.latencies.extend(latencies)
        results = []
        for kind, one in timed.items():
            expected = args.warmup + len(one.latencies)
            deadline = time.monotonic() + 30
            while (depth := one.scope.depth(one.queue)) < expected and time.monotonic() < deadline:
                time.sleep(0.1)
            if depth != expected:
                raise SystemExit(f"{kind}: {depth} messages in the queue, not {expected}")
            calls = len(one.latencies)
            micros = sorted(ns / 1000 for ns in one.latencies)
            results.append(
                Cost(
                    kind,
                    round_no,
                    calls / one.seconds,
                    percentile(micros, 50),
                    percentile(micros, 99),
                    1e6 * one.cpu / calls,
                )
            )
    return results


# -- reporting ---------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile of an already sorted sequence (nearest rank)."""
    if not ordered:
        return 0.0
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return float(ordered[rank])


def spread(values: Sequence[float], fmt: str = ".0f") -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def ratios(items: Sequence[Any], top: str, bottom: str, metric: str) -> list[float]:
    """Per-round ``top / bottom`` of ``metric``."""
    by_round: dict[int, dict[str, Any]] = {}
    for item in items:
        by_round.setdefault(item.round, {})[item.kind] = item
    return [
        getattr(pair[top], metric) / getattr(pair[bottom], metric)
        for pair in by_round.values()
        if top in pair and bottom in pair
    ]


def interleaved(
    rounds: int,
    kinds: Sequence[str],
    measure: Callable[[str, int], Any],
    show: Callable[[Any], str],
) -> list[Any]:
    """Every kind once a round; the order reversed every other round."""
    results = []
    for round_no in range(rounds):
        order = kinds if round_no % 2 == 0 else tuple(reversed(kinds))
        for kind in order:
            result = measure(kind, round_no)
            results.append(result)
            print(f"  round {round_no + 1} {kind:>13}: {show(result)}", flush=True)
    return results


def report_isolation(results: list[Isolation], args: Any) -> float:
    print(
        f"\nisolation: rate {args.rate:g}/s burst {args.burst} per tenant; {args.quiet} quiet "
        f"tenants at {args.rate / 2:g}/s each; noisy tenant offered {args.factor:g}x its rate; "
        f"{args.seconds:g} s a measurement, {args.rounds} rounds (median [min-max])"
    )
    for kind in ("alone", "beside"):
        rs = [r for r in results if r.kind == kind]
        print(
            f"  quiet tenants {kind:>6}: {spread([r.quiet_per_s for r in rs])} publishes/s, "
            f"p50 {spread([r.quiet_p50_ms for r in rs], '.2f')} ms, "
            f"p99 {spread([r.quiet_p99_ms for r in rs], '.2f')} ms, "
            f"refused {sum(r.quiet_refused for r in rs)}"
        )
    noisy = [r for r in results if r.kind == "beside"]
    admitted = [r.noisy_admitted / r.noisy_model for r in noisy]
    print(
        f"  noisy tenant: offered {spread([r.noisy_offered for r in noisy])}, admitted "
        f"{spread([r.noisy_admitted for r in noisy])}, model burst + rate x elapsed "
        f"{spread([r.noisy_model for r in noisy], '.1f')}: admitted/model "
        f"{spread(admitted, '.3f')}"
    )
    quiet = ratios(results, "beside", "alone", "quiet_per_s")
    ratio = statistics.median(quiet)
    verdict = "met" if ratio >= QUIET_GOAL else "NOT met"
    print(
        f"  quiet throughput beside/alone: {spread(quiet, '.3f')} (goal >= {QUIET_GOAL}: {verdict})"
    )
    return ratio


def report_cost(results: list[Cost], args: Any, baseline: str) -> float:
    print(
        f"\npublish cost: {args.n} calls of each kind a round (+{args.warmup} warm-up), "
        f"taking turns in {args.slices} slices; {args.rounds} rounds (median [min-max])"
    )
    for kind in dict.fromkeys(r.kind for r in results):
        rs = [r for r in results if r.kind == kind]
        print(
            f"  {kind:>13}: {spread([r.per_s for r in rs])} publishes/s, "
            f"p50 {spread([r.p50_us for r in rs])} us, p99 {spread([r.p99_us for r in rs])} us, "
            f"producer CPU {spread([r.cpu_us for r in rs])} us"
        )
    shown = [("tenant", baseline), ("tenant", "capped"), ("capped", baseline)]
    if baseline != "plain":
        shown += [("tenant", "plain"), (baseline, "plain"), ("confirm+ping", baseline)]
    for top, bottom in shown:
        per_round = ratios(results, top, bottom, "per_s")
        p50 = ratios(results, top, bottom, "p50_us")
        cpu = ratios(results, top, bottom, "cpu_us")
        print(
            f"  {top}/{bottom}: publishes/s {spread(per_round, '.3f')}; p50 latency "
            f"{spread(p50, '.3f')}; producer CPU per publish {spread(cpu, '.3f')}"
        )
    ratio = statistics.median(ratios(results, "tenant", baseline, "per_s"))
    if baseline == "plain":
        verdict = (
            "met" if ratio >= REDIS_GOAL else "floor met" if ratio >= REDIS_FLOOR else "NOT met"
        )
        print(
            f"  goal on Redis: tenant/plain >= {REDIS_GOAL} (at least {REDIS_FLOOR}): "
            f"{ratio:.3f} ({verdict})"
        )
    else:
        verdict = (
            "met" if ratio >= REDIS_GOAL else "floor met" if ratio >= REDIS_FLOOR else "NOT met"
        )
        ceiling = statistics.median(ratios(results, "confirm+ping", baseline, "per_s"))
        print(
            f"  goal on RabbitMQ: tenant/{baseline} >= {REDIS_GOAL} (at least {REDIS_FLOOR}): "
            f"{ratio:.3f} ({verdict}); one bare Redis round trip per publish allows at most "
            f"{ceiling:.3f} here (confirm+ping/{baseline})"
        )
    return ratio


# -- main ----------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--broker", default="redis", help="redis, rabbitmq or a broker URL")
    parser.add_argument("--state", default=None, help="tenant state Redis URL")
    parser.add_argument("--rounds", type=int, default=6, help="rounds (even)")
    parser.add_argument("--seconds", type=float, default=6.0, help="isolation: per measurement")
    parser.add_argument("--rate", type=float, default=5.0, help="per-tenant rate (/s)")
    parser.add_argument("--burst", type=int, default=10, help="per-tenant burst")
    parser.add_argument("--quiet", type=int, default=50, help="quiet tenants")
    parser.add_argument("--factor", type=float, default=20.0, help="noisy tenant: x its rate")
    parser.add_argument("--n", type=int, default=3000, help="publish cost: timed calls")
    parser.add_argument("--warmup", type=int, default=200, help="publish cost: untimed calls")
    parser.add_argument(
        "--slices", type=int, default=20, help="publish cost: turns the kinds take in a round"
    )
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.rounds % 2:
        parser.error("--rounds must be even (each order equally often)")
    if args.n < 1 or args.slices < 1 or args.warmup < 0 or args.seconds <= 0 or args.quiet < 1:
        parser.error("--n, --slices and --quiet must be >= 1, --warmup >= 0, --seconds > 0")
    args.broker_url = BROKERS.get(args.broker, args.broker)
    if not args.broker_url.startswith(("redis://", "rediss://", "amqp://", "pyamqp://")):
        parser.error(f"--broker: redis, rabbitmq or a redis:// or amqp:// URL, not {args.broker}")
    if args.state is None:
        args.state = args.broker_url if args.broker_url.startswith("redis") else DEFAULT_STATE
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    redis_broker = args.broker_url.startswith("redis")
    run = f"bench-tenants-{time.strftime('%H%M%S')}-{secrets.token_hex(3)}"
    with Connection(args.broker_url) as conn:
        conn.ensure_connection(max_retries=1)
    probe = tenant_app(args.broker_url, run, args.state, "probe", 1.0, 1)
    bulkhead = installed_on(probe)
    one_call = bulkhead.admission._one_call(bulkhead.pool("probe"))
    print(
        f"tenants bench: broker {args.broker}, state {args.state.rsplit('@', 1)[-1]}, "
        f"run {run}; one Lua call per tenant publish: {one_call}; pid {os.getpid()}",
        flush=True,
    )
    started = time.monotonic()
    print("isolation:")
    isolation = interleaved(
        args.rounds,
        ("alone", "beside"),
        lambda kind, n: run_isolation(args, run, kind, n),
        lambda r: (
            f"quiet {r.quiet_per_s:7.1f}/s (refused {r.quiet_refused}), noisy admitted "
            f"{r.noisy_admitted}/{r.noisy_offered} (model {r.noisy_model:.1f})"
        ),
    )
    baseline = "plain" if redis_broker else "plain-confirm"
    kinds = (
        ("plain", "capped", "tenant")
        if redis_broker
        else ("plain-confirm", "capped", "tenant", "plain", "confirm+ping")
    )
    print("publish cost:")
    costs: list[Cost] = []
    for round_no in range(args.rounds):
        for r in run_cost_round(args, run, kinds, round_no):
            costs.append(r)
            print(
                f"  round {round_no + 1} {r.kind:>13}: {r.per_s:7.0f} publishes/s, "
                f"p50 {r.p50_us:5.0f} us, p99 {r.p99_us:6.0f} us, CPU {r.cpu_us:4.0f} us",
                flush=True,
            )
    report_isolation(isolation, args)
    report_cost(costs, args, baseline)
    print(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
