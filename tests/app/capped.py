"""The Celery app for admission tests: pools with caps and each on_full policy."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

from celery_bulkhead import Bulkhead, Pool, followups

RECORDS_URL = "redis://127.0.0.1:6379/9"


def make_capped_app(broker_url: str, prefix: str, **conf: Any) -> Celery:
    app = Celery("capped", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        # Results (chords, dropped canvas members) in the records database, under the prefix.
        result_backend=RECORDS_URL,
        result_backend_transport_options={"global_keyprefix": f"{prefix}:"},
        result_expires=600,
        task_default_queue=f"{prefix}.default",
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": 4,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        },
        worker_hijack_root_logger=False,
        broker_heartbeat_checkrate=120,
    )
    publish_timeout = conf.pop("publish_timeout", None)
    app.conf.update(conf)
    bulkhead = Bulkhead(
        app,
        pools=[
            Pool("capped", max_queue=100, queue=f"{prefix}.capped"),
            Pool("open", queue=f"{prefix}.open"),  # no cap
            Pool("small", max_queue=2, queue=f"{prefix}.small", tasks=["capped.small.*"]),
            Pool("dropper", max_queue=3, on_full="drop", queue=f"{prefix}.dropper"),
            Pool(
                "blocker",
                max_queue=2,
                on_full="block",
                block_timeout=1.0,
                queue=f"{prefix}.blocker",
            ),
            Pool(
                "limited",
                max_queue=2,
                queue=f"{prefix}.limited",
                worker_pool="prefork",
                concurrency=1,
                time_limit=2,
            ),
            Pool(
                "retrier",
                max_queue=2,
                queue=f"{prefix}.retrier",
                worker_pool="threads",
                concurrency=1,
            ),
        ],
        publish_timeout=publish_timeout,
    )
    records = redis.Redis.from_url(RECORDS_URL)

    def record(task: Any, event: str, **data: Any) -> None:
        entry = {
            "event": event,
            "task": task.name,
            "id": task.request.id,
            "retries": task.request.retries,
            "routing_key": (task.request.delivery_info or {}).get("routing_key"),
            "published_at": getattr(task.request, "bulkhead_published_at", None),
            "at": time.time(),
            **data,
        }
        records.rpush(f"{prefix}:log", json.dumps(entry))

    @app.task(bulkhead="capped", name="capped.noop", shared=False)
    def noop(i: int = 0) -> None: ...

    @app.task(bulkhead="open", name="capped.plain", shared=False)
    def plain(i: int = 0) -> None: ...

    @app.task(name="capped.small.noop", shared=False)
    def small_noop(i: int = 0) -> None: ...

    @app.task(bulkhead="dropper", name="capped.drop_me", shared=False, ignore_result=False)
    def drop_me(i: int = 0) -> None: ...

    @app.task(bulkhead="blocker", name="capped.block_me", shared=False)
    def block_me(i: int = 0) -> None: ...

    @bulkhead.task(pool="retrier", bind=True, name="capped.flaky", shared=False, max_retries=3)
    def flaky(self: Any, tag: str, release_key: str) -> None:
        """Waits for the test, then retries once: the retry must never be refused."""
        record(self, "started", tag=tag)
        if self.request.retries == 0:
            records.blpop([release_key], timeout=60)
            raise self.retry(countdown=0)
        record(self, "done", tag=tag)

    @bulkhead.task(pool="retrier", bind=True, name="capped.step", shared=False, ignore_result=False)
    def step(self: Any, previous: Any, tag: str, release_key: str | None = None) -> str:
        record(self, "started", tag=tag, previous=previous)
        if release_key:
            records.blpop([release_key], timeout=60)
        record(self, "done", tag=tag, previous=previous)
        return tag

    @bulkhead.task(pool="retrier", bind=True, name="capped.fill", shared=False)
    def fill(self: Any, tag: str) -> None:
        record(self, "done", tag=tag)

    @bulkhead.task(pool="limited", bind=True, name="capped.hang", shared=False)
    def hang(self: Any, tag: str, release_key: str) -> None:
        """Hangs past the pool's time_limit (2 s): the worker's main process fails it."""
        record(self, "started", tag=tag)
        records.blpop([release_key], timeout=60)

    @bulkhead.task(pool="retrier", bind=True, name="capped.fail_after", shared=False)
    def fail_after(self: Any, tag: str, release_key: str) -> None:
        """Waits for the test, then fails: its errback must never be refused."""
        record(self, "started", tag=tag)
        records.blpop([release_key], timeout=60)
        raise ValueError(f"{tag} failed on purpose")

    return app


if os.environ.get("BULKHEAD_TEST_IDS_ONLY"):
    # Workers that must recognise unmarked follow-ups by their ids alone, as on
    # Celery < 5.7, which does not mark the publishes it makes for a finished task.
    followups._dispatching = None

app = make_capped_app(
    os.environ.get("BULKHEAD_TEST_BROKER", "redis://127.0.0.1:6379/9"),
    os.environ.get("BULKHEAD_TEST_PREFIX", "bulkhead-test"),
)
