"""The Celery app whose tasks end in every outcome a pool worker counts.

Workers import it with ``celery -A tests.app.outcomes``; the broker URL, the
queue-name prefix and the first metrics port come from the environment the
test harness sets (as for tests/app/shop.py).  Its one pool, ``outcomes``,
runs on prefork, the only execution pool with hard time limits and
``revoke(terminate=True)``.  Tasks report to the Redis list ``<prefix>:log``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery
from celery.exceptions import Ignore, Reject

from celery_bulkhead import Bulkhead, Pool

RECORDS_URL = "redis://127.0.0.1:6379/9"
POOL = "outcomes"
#: A retry is published again at once: the default retry delay is three minutes.
_AT_ONCE = {"countdown": 0}


class Flaky(Exception):
    """What the flaky tasks raise until they are through their failures."""


def make_outcomes_app(broker_url: str, prefix: str, metrics_port: int | None = None) -> Celery:
    app = Celery("outcomes", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        task_default_queue=f"{prefix}.default",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        bulkhead_metrics_port=metrics_port,
    )
    Bulkhead(
        app,
        pools=[
            Pool(
                POOL,
                concurrency=2,
                queue=f"{prefix}.{POOL}",
                worker_pool="prefork",
                time_limit=120,  # nothing here runs for ever; tasks set their own limits
                drain_timeout=1.5,
            )
        ],
    )
    records = redis.Redis.from_url(RECORDS_URL)

    def record(task: Any, event: str, tag: str, **data: Any) -> None:
        entry = {
            "event": event,
            "tag": tag,
            "task": task.name,
            "id": task.request.id,
            "retries": task.request.retries,
            "at": time.time(),
            **data,
        }
        records.rpush(f"{prefix}:log", json.dumps(entry))

    @app.task(bind=True, bulkhead=POOL, name="outcomes.succeed", shared=False)
    def succeed(self: Any, tag: str) -> None:
        record(self, "done", tag)

    @app.task(bind=True, bulkhead=POOL, name="outcomes.fail", shared=False)
    def fail(self: Any, tag: str) -> None:
        record(self, "started", tag)
        raise ValueError("asked to fail")

    @app.task(
        bind=True,
        bulkhead=POOL,
        name="outcomes.autoretry",
        shared=False,
        autoretry_for=(Flaky,),
        max_retries=3,
        retry_kwargs=_AT_ONCE,
    )
    def autoretry(self: Any, tag: str, failures: int) -> None:
        """Raises Flaky on its first ``failures`` runs; ``autoretry_for`` retries it."""
        record(self, "started", tag)
        if self.request.retries < failures:
            raise Flaky(f"run {self.request.retries}")
        record(self, "done", tag)

    @app.task(bind=True, bulkhead=POOL, name="outcomes.self_retry", shared=False, max_retries=2)
    def self_retry(self: Any, tag: str, failures: int) -> None:
        """Calls ``self.retry(exc=...)`` on its first ``failures`` runs."""
        record(self, "started", tag)
        if self.request.retries < failures:
            raise self.retry(exc=Flaky(f"run {self.request.retries}"), **_AT_ONCE)
        record(self, "done", tag)

    @app.task(bind=True, bulkhead=POOL, name="outcomes.hard_limit", shared=False, time_limit=1)
    def hard_limit(self: Any, tag: str) -> None:
        """Runs past its hard time limit: the execution pool kills the process."""
        record(self, "started", tag)
        time.sleep(60)

    @app.task(
        bind=True,
        bulkhead=POOL,
        name="outcomes.soft_limit",
        shared=False,
        soft_time_limit=0.5,
        time_limit=30,
    )
    def soft_limit(self: Any, tag: str) -> None:
        """Runs past its soft time limit and lets SoftTimeLimitExceeded propagate."""
        record(self, "started", tag)
        time.sleep(30)

    @app.task(bind=True, bulkhead=POOL, name="outcomes.reject", shared=False)
    def reject(self: Any, tag: str) -> None:
        record(self, "started", tag)
        raise Reject("asked to reject", requeue=False)

    @app.task(bind=True, bulkhead=POOL, name="outcomes.ignore", shared=False)
    def ignore(self: Any, tag: str) -> None:
        record(self, "started", tag)
        raise Ignore()

    @app.task(bind=True, bulkhead=POOL, name="outcomes.hang", shared=False)
    def hang(self: Any, tag: str, release_key: str, timeout: float = 60.0) -> None:
        """Blocks until the test pushes to ``release_key`` (or revokes it)."""
        record(self, "started", tag)
        records.blpop([release_key], timeout=timeout)
        record(self, "done", tag)

    return app


_port = os.environ.get("BULKHEAD_TEST_METRICS_PORT")
app = make_outcomes_app(
    os.environ.get("BULKHEAD_TEST_BROKER", "redis://127.0.0.1:6379/9"),
    os.environ.get("BULKHEAD_TEST_PREFIX", "bulkhead-test"),
    int(_port) if _port else None,
)
