"""An app with two pools whose queues share a prefix: ``<prefix>.pay`` and ``<prefix>.payments``.

Workers import it with ``celery -A tests.app.prefixed``; the broker URL and the
queue-name prefix come from the environment, as for ``tests.app.shop``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

from celery_bulkhead import Bulkhead, Pool

RECORDS_URL = "redis://127.0.0.1:6379/9"


def make_prefixed_app(broker_url: str, prefix: str) -> Celery:
    app = Celery("prefixed", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        task_default_queue=f"{prefix}.default",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    Bulkhead(
        app,
        pools=[
            Pool("pay", queue=f"{prefix}.pay", worker_pool="threads", concurrency=2),
            Pool("payments", queue=f"{prefix}.payments", worker_pool="threads", concurrency=2),
        ],
    )
    records = redis.Redis.from_url(RECORDS_URL)

    def record(task: Any, event: str, tag: str) -> None:
        entry = {"event": event, "task": task.name, "id": task.request.id, "tag": tag}
        records.rpush(f"{prefix}:log", json.dumps(entry))

    @app.task(bind=True, bulkhead="pay", name="prefixed.echo", shared=False)
    def echo(self: Any, tag: str) -> None:
        record(self, "done", tag)

    @app.task(bind=True, bulkhead="payments", name="prefixed.hang", shared=False)
    def hang(self: Any, tag: str, release_key: str) -> None:
        """Runs until the test pushes to release_key."""
        record(self, "started", tag)
        # Polled, not a blocking BLPOP: a blocking read on a shared client was
        # seen to time out after 5 s in a worker under load.
        deadline = time.monotonic() + 60
        while records.lpop(release_key) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        record(self, "done", tag)

    return app


app = make_prefixed_app(
    os.environ.get("BULKHEAD_TEST_BROKER", "redis://127.0.0.1:6379/9"),
    os.environ.get("BULKHEAD_TEST_PREFIX", "bulkhead-test"),
)
