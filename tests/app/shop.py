"""The Celery app the tests run real workers for.

Workers import it with ``celery -A tests.app.shop``; the broker URL and the
queue-name prefix come from the environment the test harness sets, so every
test session gets queues of its own.  Tasks report what they did to a Redis
list (``<prefix>:log``) that the tests wait on.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import redis
from celery import Celery

from celery_bulkhead import Bulkhead, Pool

RECORDS_URL = "redis://127.0.0.1:6379/9"


def make_app(broker_url: str, prefix: str, metrics_port: int | None = None) -> Celery:
    app = Celery("shop", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        task_default_queue=f"{prefix}.default",
        task_routes={"legacy.*": {"queue": f"{prefix}.legacy"}},
        task_queues=None,
        broker_connection_retry_on_startup=True,
        # Redis: a message held by a worker that was killed comes back after
        # visibility_timeout, found by a scan every interval x throttle seconds.
        broker_transport_options={
            "visibility_timeout": 4,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        },
        worker_hijack_root_logger=False,
        bulkhead_metrics_port=metrics_port,
    )
    bulkhead = Bulkhead(
        app,
        pools=[
            Pool(
                "fast",
                concurrency=2,
                queue=f"{prefix}.fast",
                worker_pool="threads",
                drain_timeout=20,
            ),
            Pool(
                "slow",
                concurrency=2,
                queue=f"{prefix}.slow",
                worker_pool="threads",
                tasks=["shop.reports.*"],
                drain_timeout=1.5,
            ),
            Pool(
                "cpu",
                concurrency=2,
                queue=f"{prefix}.cpu",
                worker_pool="prefork",
                time_limit=300,
                soft_time_limit=200,
                drain_timeout=1.5,
            ),
            Pool(
                "metered",
                concurrency=4,
                queue=f"{prefix}.metered",
                worker_pool="prefork",
                max_queue=1000,
                drain_timeout=1.5,
            ),
        ],
    )
    records = redis.Redis.from_url(RECORDS_URL)

    def record(task: Any, event: str, **data: Any) -> None:
        info = task.request.delivery_info or {}
        entry = {
            "event": event,
            "task": task.name,
            "id": task.request.id,
            "hostname": task.request.hostname,
            "routing_key": info.get("routing_key"),
            "redelivered": bool(info.get("redelivered")),
            "at": time.time(),
            "pid": os.getpid(),
            **data,
        }
        records.rpush(f"{prefix}:log", json.dumps(entry))

    @app.task(bind=True, bulkhead="fast", name="shop.echo", shared=False)
    def echo(self: Any, tag: str, submitted_at: float = 0.0) -> None:
        record(self, "done", tag=tag, submitted_at=submitted_at)

    @bulkhead.task(bind=True, pool="fast", name="shop.via_bulkhead_decorator", shared=False)
    def via_bulkhead_decorator(self: Any, tag: str) -> None:
        record(self, "done", tag=tag)

    @app.task(bind=True, bulkhead="slow", name="shop.hang", shared=False)
    def hang(self: Any, tag: str, release_key: str, timeout: float = 60.0) -> None:
        """A hung downstream: blocks until the test pushes to release_key."""
        record(self, "started", tag=tag)
        records.blpop([release_key], timeout=timeout)
        record(self, "done", tag=tag)

    @app.task(bind=True, bulkhead="cpu", name="shop.cpu_hang", shared=False)
    def cpu_hang(self: Any, tag: str, release_key: str, timeout: float = 60.0) -> None:
        """shop.hang on the prefork pool."""
        record(self, "started", tag=tag)
        records.blpop([release_key], timeout=timeout)
        record(self, "done", tag=tag)

    @app.task(bind=True, bulkhead="fast", name="shop.work", shared=False)
    def work(self: Any, tag: str, release_key: str, timeout: float = 60.0) -> None:
        """Runs until released (or timeout), for drain tests."""
        record(self, "started", tag=tag)
        records.blpop([release_key], timeout=timeout)
        record(self, "done", tag=tag)

    @app.task(bind=True, name="shop.reports.daily", shared=False)
    def daily_report(self: Any, tag: str) -> None:
        record(self, "done", tag=tag)

    @app.task(bind=True, bulkhead="cpu", name="shop.where", shared=False)
    def where(self: Any, tag: str) -> None:
        record(self, "done", tag=tag, node=socket.gethostname())

    @app.task(bind=True, bulkhead="metered", name="shop.metered", shared=False)
    def metered(self: Any, tag: str, fail: bool = False, release_key: str | None = None) -> None:
        if release_key:
            record(self, "started", tag=tag)
            records.blpop([release_key], timeout=60)
        if fail:
            raise ValueError("asked to fail")
        record(self, "done", tag=tag)

    @app.task(bind=True, name="legacy.cleanup", shared=False)
    def legacy_cleanup(self: Any, tag: str) -> None:
        record(self, "done", tag=tag)

    @app.task(bind=True, name="shop.unpooled", shared=False)
    def unpooled(self: Any, tag: str) -> None:
        record(self, "done", tag=tag)

    return app


_port = os.environ.get("BULKHEAD_TEST_METRICS_PORT")
app = make_app(
    os.environ.get("BULKHEAD_TEST_BROKER", "redis://127.0.0.1:6379/9"),
    os.environ.get("BULKHEAD_TEST_PREFIX", "bulkhead-test"),
    int(_port) if _port else None,
)
