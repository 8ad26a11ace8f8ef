"""The demo's story: one shop's Celery app, run two ways, and the work sent to it.

The shop has three kinds of background work:

* ``payments``: a steady stream of fast tasks (``demo.charge``, 20 ms each);
* ``webhooks``: calls to a third-party HTTP endpoint (``demo.deliver``), the
  local downstream the demo starts, which hangs, then fails, then recovers;
* ``reports``: slow tasks (``demo.report``, 0.5 s) for several tenants, one of
  which (``bigcorp``) floods the queue.

:func:`make_app` builds the app either as plain Celery (every task on one
queue, one worker) or with bulkheads (one pool per kind of work, a
:class:`~celery_bulkhead.Breaker` on webhooks, a
:class:`~celery_bulkhead.TenantLimit` on reports, queue caps with their
``on_full`` policies).  The same function builds the app in the demo's own
process (the producer) and in the worker processes, which import
:mod:`celery_bulkhead.demo.app`; :class:`DemoConfig` travels between them in
environment variables.

Every task writes one record (JSON) to the Redis list ``<prefix>:records``
when it ends: its pool, sequence number, submit, start and end times
(``time.time()`` on this machine), whether it failed, and how often a worker
had pushed it back.  Those records are what the report measures.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from celery import Celery

    from celery_bulkhead import Pool

__all__ = [
    "ENV_CONFIG",
    "POOLS",
    "REPORT_SECONDS",
    "TASKS",
    "DemoConfig",
    "Submission",
    "Timeline",
    "make_app",
    "pools",
    "workload",
]

Mode = Literal["plain", "bulkhead"]

#: The pools, in the order they are reported.
POOLS: tuple[str, ...] = ("payments", "webhooks", "reports")
#: The task of each pool.
TASKS: dict[str, str] = {
    "payments": "demo.charge",
    "webhooks": "demo.deliver",
    "reports": "demo.report",
}
#: The environment variable carrying a :class:`DemoConfig` to the workers (JSON).
ENV_CONFIG = "CELERY_BULKHEAD_DEMO_CONFIG"

CHARGE_SECONDS = 0.02
REPORT_SECONDS = 0.5
#: How long a webhook call waits for the downstream before it gives up.
HTTP_TIMEOUT = 2.0
#: The rates of the steady streams (tasks per second).
PAYMENTS_RATE = 10.0
WEBHOOKS_RATE = 10.0
#: Quiet tenants of the reports pool, each sending one report every two seconds.
QUIET_TENANTS: tuple[str, ...] = ("acme", "globex", "initech")
QUIET_RATE = 0.5
#: The noisy neighbour: this many reports at once, spread over one second.
FLOOD_TENANT = "bigcorp"
FLOOD_SIZE = 40


@dataclass(frozen=True)
class Timeline:
    """When things happen within one run's ``duration`` seconds of load.

    The downstream is healthy, then *hangs* (accepts the connection and never
    answers) from ``hang_at``, then *fails* (answers 503 at once) from
    ``fail_at``, then is healthy again from ``recover_at``.  The reports flood
    starts at ``flood_at``.
    """

    duration: float

    @property
    def flood_at(self) -> float:
        return 0.10 * self.duration

    @property
    def hang_at(self) -> float:
        return 0.20 * self.duration

    @property
    def fail_at(self) -> float:
        return 0.55 * self.duration

    @property
    def recover_at(self) -> float:
        return 0.70 * self.duration

    def phase(self, elapsed: float) -> str:
        """The downstream's state ``elapsed`` seconds into the load: healthy, hanging, failing."""
        if self.hang_at <= elapsed < self.fail_at:
            return "hanging"
        if self.fail_at <= elapsed < self.recover_at:
            return "failing"
        return "healthy"


@dataclass(frozen=True)
class Submission:
    """One task the producer sends, ``at`` seconds into the load."""

    at: float
    pool: str
    seq: int
    tenant: str | None = None


def workload(timeline: Timeline) -> list[Submission]:
    """The same list of submissions for both runs, in time order (deterministic)."""
    duration = timeline.duration
    plan: list[tuple[float, str, str | None]] = []
    for rate, stream in ((PAYMENTS_RATE, "payments"), (WEBHOOKS_RATE, "webhooks")):
        n = int(duration * rate)
        plan += [(i / rate, stream, None) for i in range(n)]
    for k, quiet in enumerate(QUIET_TENANTS):
        offset = k / (QUIET_RATE * len(QUIET_TENANTS))
        n = int((duration - offset) * QUIET_RATE)
        plan += [(offset + i / QUIET_RATE, "reports", quiet) for i in range(max(n, 0))]
    plan += [
        (timeline.flood_at + i / FLOOD_SIZE, "reports", FLOOD_TENANT) for i in range(FLOOD_SIZE)
    ]
    plan.sort(key=lambda item: item[0])
    counters: dict[str, int] = {}
    submissions = []
    for at, pool, tenant in plan:
        seq = counters.get(pool, 0)
        counters[pool] = seq + 1
        submissions.append(Submission(at, pool, seq, tenant))
    return submissions


@dataclass(frozen=True)
class DemoConfig:
    """What a demo app needs to know; the same in the producer and in the workers.

    ``prefix`` names everything the run creates on the broker: queues, kombu's
    keys (``global_keyprefix``), the records list, the breaker's name.
    ``tenant_suffix`` keeps the tenant limit's keys of one demo apart from any
    other app's on a shared Redis.
    """

    mode: Mode
    broker_url: str
    prefix: str
    downstream: str
    tenant_suffix: str = ""
    metrics_port: int | None = None
    http_timeout: float = HTTP_TIMEOUT
    reset_timeout: float = 2.0

    def to_environ(self) -> dict[str, str]:
        """The environment variable that carries this configuration to a worker."""
        return {ENV_CONFIG: json.dumps(self.__dict__)}

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> DemoConfig:
        """The configuration the demo gave this worker process."""
        raw = (os.environ if environ is None else environ).get(ENV_CONFIG)
        if not raw:
            raise RuntimeError(
                f"{ENV_CONFIG} is not set: celery_bulkhead.demo.app is the app of the workers "
                "that `python -m celery_bulkhead.demo` starts, not one to run by hand"
            )
        return cls(**json.loads(raw))

    @property
    def records_key(self) -> str:
        return f"{self.prefix}:records"

    @property
    def breaker_key(self) -> str:
        return f"{self.prefix}:breaker"

    @property
    def breaker_name(self) -> str:
        return f"{self.prefix}-webhooks"

    @property
    def plain_queue(self) -> str:
        return f"{self.prefix}.plain"

    def queue_of(self, pool: str) -> str:
        """The broker queue ``pool``'s tasks go to in this mode."""
        return self.plain_queue if self.mode == "plain" else f"{self.prefix}.{pool}"

    def tenant_id(self, tenant: str) -> str:
        return f"{tenant}{self.tenant_suffix}"


# -- the records the tasks write ------------------------------------------------------

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def _records_client(url: str) -> Any:
    """One Redis client per process (created on first use, after any fork)."""
    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            import redis

            client = _clients[url] = redis.Redis.from_url(url, socket_timeout=10)
        return client


def _record(config: DemoConfig, request: Any, pool: str, **fields: Any) -> None:
    from celery_bulkhead.worker.gate import DEFERRALS

    deferrals = getattr(request, DEFERRALS, None)
    entry = {
        "pool": pool,
        "done": time.time(),
        "pid": os.getpid(),
        "deferrals": deferrals if isinstance(deferrals, int) else 0,
        **fields,
    }
    _records_client(config.broker_url).rpush(config.records_key, json.dumps(entry))


class _BreakerLog:
    """A pybreaker listener: every transition a worker makes, with its time, into Redis."""

    def __init__(self, config: DemoConfig) -> None:
        self.config = config

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        entry = {"at": time.time(), "old": old_state.name, "new": new_state.name}
        _records_client(self.config.broker_url).rpush(self.config.breaker_key, json.dumps(entry))


class DownstreamError(Exception):
    """The webhook's endpoint answered with an error, or not at all."""


# -- the app --------------------------------------------------------------------------


def pools(config: DemoConfig) -> list[Pool]:
    """The bulkheads: one pool per kind of work, 8 worker threads in all."""
    from celery_bulkhead import Breaker, Pool, TenantLimit

    common: dict[str, Any] = {"worker_pool": "threads", "drain_timeout": 3.0}
    return [
        # Fast and steady: a generous cap, refused (an error the caller sees) when full.
        Pool(
            "payments",
            concurrency=2,
            max_queue=200,
            on_full="reject",
            queue=config.queue_of("payments"),
            **common,
        ),
        # A third party that may hang: a small cap (overflow dropped and counted) and a
        # breaker that stops the whole fleet calling it while it is down.
        Pool(
            "webhooks",
            concurrency=4,
            max_queue=10,
            on_full="drop",
            queue=config.queue_of("webhooks"),
            breaker=Breaker(
                name=config.breaker_name,
                fail_max=3,
                reset_timeout=config.reset_timeout,
                cache_seconds=0.25,
                listeners=(_BreakerLog(config),),
            ),
            **common,
        ),
        # Slow and multi-tenant: each tenant gets 1 report/s (burst 3) at submit and
        # one of the two slots at a time; a full queue makes the producer wait.
        Pool(
            "reports",
            concurrency=2,
            max_queue=10,
            on_full="block",
            block_timeout=1.0,
            queue=config.queue_of("reports"),
            tenant=TenantLimit(key="tenant", rate="1/s", burst=3, max_inflight=1),
            **common,
        ),
    ]


PLAIN_CONCURRENCY = 8  # the pools' concurrency, added up


def make_app(config: DemoConfig) -> Celery:
    """The shop's app, plain or with bulkheads (``config.mode``)."""
    from celery import Celery

    app = Celery("bulkhead_demo", broker=config.broker_url, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        task_default_queue=config.plain_queue,
        task_default_exchange=config.plain_queue,
        task_default_routing_key=config.plain_queue,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        # Every kombu key of the run starts with the prefix, so a shared Redis is
        # cleaned up by prefix; a short visibility timeout bounds a deferral's hop.
        broker_transport_options={
            "global_keyprefix": f"{config.prefix}:",
            "visibility_timeout": 60,
        },
        bulkhead_metrics_port=config.metrics_port,
    )
    task_options: dict[str, dict[str, Any]] = {pool: {} for pool in POOLS}
    if config.mode == "bulkhead":
        from celery_bulkhead import Bulkhead

        Bulkhead(app, pools=pools(config))
        task_options = {pool: {"bulkhead": pool} for pool in POOLS}

    @app.task(name=TASKS["payments"], bind=True, shared=False, **task_options["payments"])
    def charge(self: Any, seq: int, submitted: float) -> None:
        started = time.time()
        time.sleep(CHARGE_SECONDS)
        _record(config, self.request, "payments", seq=seq, submitted=submitted, started=started)

    @app.task(name=TASKS["webhooks"], bind=True, shared=False, **task_options["webhooks"])
    def deliver(self: Any, seq: int, submitted: float) -> None:
        started = time.time()
        error = None
        try:
            url = f"{config.downstream}?seq={seq}"
            with urllib.request.urlopen(url, timeout=config.http_timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            error = f"HTTP {exc.code}"
        except OSError as exc:  # a timeout, a refused connection
            error = type(exc).__name__
        _record(
            config,
            self.request,
            "webhooks",
            seq=seq,
            submitted=submitted,
            started=started,
            error=error,
        )
        if error is not None:
            raise DownstreamError(error)

    @app.task(name=TASKS["reports"], bind=True, shared=False, **task_options["reports"])
    def report(self: Any, seq: int, submitted: float, tenant: str) -> None:
        started = time.time()
        time.sleep(REPORT_SECONDS)
        _record(
            config,
            self.request,
            "reports",
            seq=seq,
            submitted=submitted,
            started=started,
            tenant=tenant,
        )

    return app
