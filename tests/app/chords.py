"""The Celery app for chord tests: a chord's body in a full pool, on every result backend.

The result backend comes from ``BULKHEAD_TEST_RESULT_BACKEND`` (Redis when
unset), so the worker processes share the backend the test submits with.
Header members run in the uncapped ``head`` pool; the body runs in a capped
pool (``rejecting`` or ``dropping``, cap 2).  Tasks report to the Redis list
``<prefix>:log``, as in the other test apps.
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
CAP = 2


def make_chords_app(broker_url: str, prefix: str, result_backend: str = RECORDS_URL) -> Celery:
    app = Celery("chords", broker=broker_url, set_as_current=False)
    app.conf.update(
        result_backend=result_backend,
        # Only used by the Redis backend: its keys stay under the test's prefix.
        result_backend_transport_options={"global_keyprefix": f"{prefix}:"},
        result_expires=600,
        # chord_unlock polls the header every second by default.
        result_chord_retry_interval=0.2,
        task_default_queue=f"{prefix}.default",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        broker_heartbeat_checkrate=120,
    )
    bulkhead = Bulkhead(
        app,
        pools=[
            Pool("head", queue=f"{prefix}.head"),  # no cap
            Pool("rejecting", max_queue=CAP, queue=f"{prefix}.rejecting"),
            Pool("dropping", max_queue=CAP, on_full="drop", queue=f"{prefix}.dropping"),
        ],
    )
    records = redis.Redis.from_url(RECORDS_URL)

    def record(task: Any, event: str, **data: Any) -> None:
        entry = {
            "event": event,
            "task": task.name,
            "id": task.request.id,
            "routing_key": (task.request.delivery_info or {}).get("routing_key"),
            "at": time.time(),
            **data,
        }
        records.rpush(f"{prefix}:log", json.dumps(entry))

    @bulkhead.task(pool="head", name="chords.part", shared=False)
    def part(i: int, seconds: float = 0.0) -> int:
        time.sleep(seconds)
        return i

    for pool in ("rejecting", "dropping"):

        @bulkhead.task(pool=pool, bind=True, name=f"chords.{pool}.body", shared=False)
        def body(self: Any, parts: list[int], tag: str) -> int:
            record(self, "done", tag=tag, parts=parts)
            return sum(parts)

        @bulkhead.task(pool=pool, name=f"chords.{pool}.fill", shared=False)
        def fill(i: int = 0) -> int:
            return i

    return app


app = make_chords_app(
    os.environ.get("BULKHEAD_TEST_BROKER", "redis://127.0.0.1:6379/9"),
    os.environ.get("BULKHEAD_TEST_PREFIX", "bulkhead-test"),
    os.environ.get("BULKHEAD_TEST_RESULT_BACKEND", RECORDS_URL),
)
