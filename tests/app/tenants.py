"""The Celery app for tenant-limit tests: pools limited per tenant, at submit and at the worker.

Workers import it with ``celery -A tests.app.tenants``; the broker URL, the
queue-name prefix and the metrics base port come from the environment (as for
tests/app/shop.py).  Tasks report to the Redis list ``<prefix>:log`` with their
tenant, times, worker pid and how often the worker had pushed them back.

The pools (their index is their metrics port's offset from the base port):

0. ``submit``: 5/s burst 2 per tenant, checked at publish (reject).
1. ``paced``: 5/s burst 1, checked at the worker only: deferred tasks come back.
2. ``flooded``: 2.5/s burst 2 at the worker, for a flood beside a quiet tenant.
3. ``inflight``: at most 2 running tasks per tenant (header ``X-Tenant``), prefork x4.
4. ``budget``: at most 1 running task per tenant, but pushed back at most 3 times.
5. ``crash``: at most 2 per tenant, prefork x2, ``time_limit=3`` (so a lease lasts
   63 s) and ``acks_late=False`` (a task killed with its worker is not redelivered,
   so only the lease's expiry can give its slot back).
6. ``renewed``: at most 1 per tenant and no time limit, so leases are renewed while
   their tasks run; ``BULKHEAD_TEST_RENEWED_LEASE`` shortens them (seconds).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

from celery_bulkhead import Bulkhead, Pool, TenantLimit
from celery_bulkhead.worker import gate
from celery_bulkhead.worker.gate import DEFERRALS

if os.environ.get("BULKHEAD_TEST_RENEWED_LEASE"):
    # Minutes in production; seconds here, so that a test outlives several leases.
    gate.RENEWED_LEASE = float(os.environ["BULKHEAD_TEST_RENEWED_LEASE"])

RECORDS_URL = "redis://127.0.0.1:6379/9"
POOLS = ("submit", "paced", "flooded", "inflight", "budget", "crash", "renewed")
#: The crash pool's hard time limit: its leases last this plus a minute.
CRASH_TIME_LIMIT = 3.0


def make_tenants_app(
    broker_url: str, prefix: str, metrics_port: int | None = None, **conf: Any
) -> Celery:
    app = Celery("tenants", broker=broker_url, set_as_current=False)
    transport: dict[str, Any] = {"visibility_timeout": 60}
    if broker_url.startswith("redis"):
        # kombu keeps the messages workers hold (deferred tasks wait there for
        # their ETA) in one "unacked" hash per database, and any consumer of the
        # database re-delivers those older than ITS visibility_timeout: another
        # app's shorter one (tests/app/shop.py: 4 s) would run ours twice.  The
        # prefix gives this app bookkeeping of its own.
        transport["global_keyprefix"] = f"{prefix}:"
    app.conf.update(
        task_ignore_result=True,
        task_default_queue=f"{prefix}.default",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        broker_transport_options=transport,
        # Tenant state under the test's own keys: the records database.
        bulkhead_state_url=os.environ.get("BULKHEAD_TEST_STATE_URL", RECORDS_URL),
        bulkhead_metrics_port=metrics_port,
    )
    app.conf.update(conf)
    pools = [
        # At submit: 5/s, burst 2, reject.
        Pool(
            "submit",
            max_queue=1000,
            queue=f"{prefix}.submit",
            worker_pool="threads",
            concurrency=4,
            tenant=TenantLimit(key="tenant", rate="5/s", burst=2),
        ),
        # At the worker: 5/s, burst 1; deferred tasks come back, none lost.
        Pool(
            "paced",
            max_queue=1000,
            queue=f"{prefix}.paced",
            worker_pool="threads",
            concurrency=4,
            drain_timeout=5,
            tenant=TenantLimit(key="tenant", rate="5/s", burst=1, enforce="worker"),
        ),
        # At the worker: 2.5/s, burst 2; one tenant floods, another stays quiet.
        Pool(
            "flooded",
            max_queue=100_000,
            queue=f"{prefix}.flooded",
            worker_pool="threads",
            concurrency=4,
            drain_timeout=5,
            tenant=TenantLimit(key="tenant", rate=2.5, burst=2, enforce="worker"),
        ),
        # At most 2 tasks of one tenant at once, fleet-wide, on prefork.
        Pool(
            "inflight",
            queue=f"{prefix}.inflight",
            worker_pool="prefork",
            concurrency=4,
            time_limit=60,
            drain_timeout=1.5,
            tenant=TenantLimit(key="header:X-Tenant", max_inflight=2),
        ),
        # At most 1 at once, but a task is pushed back at most 3 times.
        Pool(
            "budget",
            queue=f"{prefix}.budget",
            worker_pool="threads",
            concurrency=4,
            drain_timeout=1.5,
            tenant=TenantLimit(key="tenant", max_inflight=1, max_deferrals=3),
        ),
        # Killed with kill -9 in the tests: short leases, no redelivery.
        Pool(
            "crash",
            queue=f"{prefix}.crash",
            worker_pool="prefork",
            concurrency=2,
            time_limit=CRASH_TIME_LIMIT,
            acks_late=False,
            drain_timeout=1.5,
            tenant=TenantLimit(key="header:X-Tenant", max_inflight=2, max_deferrals=1000),
        ),
        # No time limit: leases renewed while their tasks run.
        Pool(
            "renewed",
            queue=f"{prefix}.renewed",
            worker_pool="threads",
            concurrency=2,
            drain_timeout=1.5,
            tenant=TenantLimit(key="tenant", max_inflight=1, max_deferrals=1000),
        ),
    ]
    assert tuple(pool.name for pool in pools) == POOLS
    Bulkhead(app, pools=pools)
    records = redis.Redis.from_url(RECORDS_URL)

    def record(task: Any, event: str, **data: Any) -> None:
        entry = {
            "event": event,
            "id": task.request.id,
            "at": time.time(),
            "pid": os.getpid(),
            "deferrals": getattr(task.request, DEFERRALS, None),
            **data,
        }
        records.rpush(f"{prefix}:log", json.dumps(entry))

    def hold(task: Any, tenant: Any, tag: str, release_key: str | None, seconds: float) -> None:
        """Start, then block until ``release_key`` gets an item (or ``seconds`` pass), then end."""
        record(task, "started", tenant=tenant, tag=tag)
        if release_key is not None:
            # Waits of a second, not one long BLPOP: under Celery 5.6's threads pool
            # this client's socket has been seen to time out after 5 s.
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if records.blpop([release_key], timeout=1):
                    break
        record(task, "done", tenant=tenant, tag=tag)

    def header_tenant(task: Any) -> Any:
        return (task.request.headers or {}).get("X-Tenant") or getattr(
            task.request, "X-Tenant", None
        )

    @app.task(bind=True, bulkhead="submit", name="tenants.submit", shared=False)
    def submitted(self: Any, tenant: str, tag: str) -> None:
        record(self, "done", tenant=tenant, tag=tag)

    @app.task(bind=True, bulkhead="paced", name="tenants.paced", shared=False)
    def paced(self: Any, tenant: str, tag: str) -> None:
        record(self, "done", tenant=tenant, tag=tag)

    @app.task(bind=True, bulkhead="flooded", name="tenants.flooded", shared=False)
    def flooded(self: Any, tenant: str, tag: str) -> None:
        record(self, "done", tenant=tenant, tag=tag)

    @app.task(bind=True, bulkhead="inflight", name="tenants.hold", shared=False)
    def held(self: Any, tag: str, release_key: str | None = None, seconds: float = 30.0) -> None:
        hold(self, header_tenant(self), tag, release_key, seconds)

    @app.task(bind=True, bulkhead="budget", name="tenants.budget", shared=False)
    def budgeted(
        self: Any, tenant: str, tag: str, release_key: str | None = None, seconds: float = 30.0
    ) -> None:
        hold(self, tenant, tag, release_key, seconds)

    @app.task(bind=True, bulkhead="renewed", name="tenants.renewed", shared=False)
    def renewed(
        self: Any, tenant: str, tag: str, release_key: str | None = None, seconds: float = 30.0
    ) -> None:
        hold(self, tenant, tag, release_key, seconds)

    @app.task(bind=True, bulkhead="crash", name="tenants.crash", shared=False)
    def crashing(
        self: Any, tag: str, release_key: str | None = None, seconds: float = 30.0
    ) -> None:
        hold(self, header_tenant(self), tag, release_key, seconds)

    return app


_port = os.environ.get("BULKHEAD_TEST_METRICS_PORT")
app = make_tenants_app(
    os.environ.get("BULKHEAD_TEST_BROKER", "redis://127.0.0.1:6379/9"),
    os.environ.get("BULKHEAD_TEST_PREFIX", "bulkhead-test"),
    int(_port) if _port else None,
)
