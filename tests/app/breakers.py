"""The Celery app for breaker tests: a pool whose tasks call a local HTTP downstream.

Workers import it with ``celery -A tests.app.breakers``; the broker URL, the
queue-name prefix and the downstream's URL come from the environment
(``BULKHEAD_TEST_DOWNSTREAM``).  Each task reports to ``<prefix>:log``.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from typing import Any

import redis
from celery import Celery

from celery_bulkhead import Breaker, Bulkhead, Pool

RECORDS_URL = "redis://127.0.0.1:6379/9"


class DownstreamError(Exception):
    """The downstream answered with an error."""


class ClientError(Exception):
    """The downstream refused the request itself (a 4xx): not the downstream's failure."""


def make_breakers_app(broker_url: str, prefix: str, **conf: Any) -> Celery:
    app = Celery("breakers", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        task_default_queue=f"{prefix}.default",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        broker_transport_options={"visibility_timeout": 60},
        bulkhead_state_url=os.environ.get("BULKHEAD_TEST_STATE_URL", RECORDS_URL),
    )
    app.conf.update(conf)
    shared = os.environ.get("BULKHEAD_TEST_BREAKER", f"{prefix}-downstream")
    Bulkhead(
        app,
        pools=[
            Pool(
                "hooks",
                queue=f"{prefix}.hooks",
                worker_pool=os.environ.get("BULKHEAD_TEST_WORKER_POOL", "prefork"),
                concurrency=int(os.environ.get("BULKHEAD_TEST_CONCURRENCY", "4")),
                max_queue=10_000,
                drain_timeout=1.5,
                breaker=Breaker(
                    name=shared,
                    fail_max=3,
                    reset_timeout=float(os.environ.get("BULKHEAD_TEST_RESET", "2")),
                    half_open_max_calls=1,
                    exclude=(ClientError,),
                    on_open=os.environ.get("BULKHEAD_TEST_ON_OPEN", "defer"),  # type: ignore[arg-type]
                    fail_fast_at_submit=True,
                    cache_seconds=0.2,
                ),
            ),
        ],
    )
    records = redis.Redis.from_url(RECORDS_URL)
    downstream = os.environ.get("BULKHEAD_TEST_DOWNSTREAM", "http://127.0.0.1:9/")

    def record(task: Any, event: str, **data: Any) -> None:
        entry = {
            "event": event,
            "id": task.request.id,
            "at": time.time(),
            "pid": os.getpid(),
            **data,
        }
        records.rpush(f"{prefix}:log", json.dumps(entry))

    @app.task(bind=True, bulkhead="hooks", name="breakers.call", shared=False)
    def call(self: Any, tag: str) -> None:
        try:
            with urllib.request.urlopen(f"{downstream}?tag={tag}", timeout=10) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            record(self, "failed", tag=tag, status=exc.code)
            if 400 <= exc.code < 500:
                raise ClientError(exc.code) from None
            raise DownstreamError(exc.code) from None
        record(self, "done", tag=tag)

    @app.task(bind=True, bulkhead="hooks", name="breakers.retrying", shared=False)
    def retrying(self: Any, tag: str) -> None:
        if self.request.retries < 2:
            raise self.retry(countdown=0)
        record(self, "done", tag=tag)

    return app


app = make_breakers_app(
    os.environ.get("BULKHEAD_TEST_BROKER", "redis://127.0.0.1:6379/9"),
    os.environ.get("BULKHEAD_TEST_PREFIX", "bulkhead-test"),
)
