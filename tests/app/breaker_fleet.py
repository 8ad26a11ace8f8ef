"""The Celery app of the breaker e2e tests: one pool whose tasks call a local HTTP downstream.

Workers import it with ``celery -A tests.app.breaker_fleet``; everything that
differs between scenarios comes from the environment the test sets (the
producer builds the same app with :func:`make_fleet_app` and the same values):

* ``BULKHEAD_TEST_BROKER``, ``BULKHEAD_TEST_PREFIX``: broker and queue-name prefix;
* ``BULKHEAD_TEST_DOWNSTREAM``: the downstream's URL (a test's HTTP server);
* ``BULKHEAD_TEST_STATE_URL``: where breaker state lives (default: Redis db 9);
* ``BULKHEAD_TEST_BREAKER``: the breaker's settings as JSON (merged over the defaults below);
* ``BULKHEAD_TEST_WORKER_POOL``, ``BULKHEAD_TEST_CONCURRENCY``: the execution pool;
* ``BULKHEAD_TEST_CAPPED``: ``0`` for a pool without ``max_queue`` (one queue);
* ``BULKHEAD_TEST_METRICS_PORT``: the node's metrics port;
* ``BULKHEAD_TEST_PUBLISH_TIMEOUT``: the publish deadline (also the state store's);
* ``BULKHEAD_TEST_TIME_LIMIT``: the pool's hard time limit (seconds);
* ``BULKHEAD_TEST_RESULTS``: ``1`` to store results in Redis db 9 under ``<prefix>:``.

Each task reports to the Redis list ``<prefix>:log`` (db 9): its tag, task
id, node and what happened.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import redis
from celery import Celery

from celery_bulkhead import Breaker, Bulkhead, CircuitOpen, Pool

RECORDS_URL = "redis://127.0.0.1:6379/9"
POOL = "hooks"
#: The breaker every scenario starts from (a test overrides some of it).
DEFAULTS: dict[str, Any] = {
    "fail_max": 3,
    "reset_timeout": 2.0,
    "cache_seconds": 0.2,
    "half_open_max_calls": 1,
    "on_open": "defer",
    "fail_fast_at_submit": True,
}


class DownstreamError(Exception):
    """The downstream answered 5xx."""


class ClientError(Exception):
    """The downstream answered 4xx: the request's fault, not the downstream's."""


def make_fleet_app(
    broker_url: str,
    prefix: str,
    *,
    breaker: Mapping[str, Any] | None = None,
    state_url: str = RECORDS_URL,
    worker_pool: str = "prefork",
    concurrency: int = 4,
    capped: bool = True,
    metrics_port: int | None = None,
    publish_timeout: float | None = None,
    results: bool = False,
    time_limit: float | None = None,
) -> Celery:
    app = Celery("breaker_fleet", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_ignore_result=not results,
        task_default_queue=f"{prefix}.default",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        broker_transport_options={"visibility_timeout": 60},
        bulkhead_state_url=state_url,
        bulkhead_metrics_port=metrics_port,
    )
    if results:
        app.conf.update(
            result_backend=RECORDS_URL,
            result_backend_transport_options={"global_keyprefix": f"{prefix}:"},
            result_expires=600,
        )
    settings = {**DEFAULTS, "name": f"{prefix}-downstream", **(breaker or {})}
    Bulkhead(
        app,
        pools=[
            Pool(
                POOL,
                queue=f"{prefix}.{POOL}",
                worker_pool=worker_pool,
                concurrency=concurrency,
                max_queue=10_000 if capped else None,
                drain_timeout=1.5,
                time_limit=time_limit,
                breaker=Breaker(exclude=(ClientError,), **settings),
            )
        ],
        publish_timeout=publish_timeout,
    )
    records = redis.Redis.from_url(RECORDS_URL)
    downstream = os.environ.get("BULKHEAD_TEST_DOWNSTREAM", "http://127.0.0.1:9/")

    def record(task: Any, event: str, tag: str) -> None:
        entry = {
            "event": event,
            "tag": tag,
            "id": task.request.id,
            "node": task.request.hostname,
            "pid": os.getpid(),
            "at": time.time(),
        }
        records.rpush(f"{prefix}:log", json.dumps(entry))

    @app.task(bind=True, bulkhead=POOL, name="fleet.call", shared=False)
    def call(self: Any, tag: str) -> None:
        """Call the downstream once; a 5xx is a failure, a 4xx is not the downstream's."""
        try:
            with urllib.request.urlopen(f"{downstream}?tag={tag}", timeout=10) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            record(self, "failed", tag)
            if 400 <= exc.code < 500:
                raise ClientError(exc.code) from None
            raise DownstreamError(exc.code) from None
        record(self, "done", tag)

    @app.task(bind=True, bulkhead=POOL, name="fleet.retrying", shared=False)
    def retrying(self: Any, tag: str) -> None:
        """Retry itself three times (``self.retry``), then succeed."""
        if self.request.retries < 3:
            record(self, "retry", tag)
            raise self.retry(countdown=0, max_retries=5)
        record(self, "done", tag)

    @app.task(bind=True, bulkhead=POOL, name="fleet.wait_then_retry", shared=False)
    def wait_then_retry(self: Any, tag: str) -> None:
        """Wait for the test's go, publish new work, retry itself once, then succeed."""
        if self.request.retries > 0:
            record(self, "done", tag)
            return
        record(self, "waiting", tag)
        deadline = time.monotonic() + 30
        while not records.get(f"{prefix}:go:{tag}") and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            call.delay(f"{tag}-new")
            record(self, "new-admitted", tag)
        except CircuitOpen:
            record(self, "new-refused", tag)
        try:
            raise self.retry(countdown=0, max_retries=1)
        except CircuitOpen:
            record(self, "retry-refused", tag)
            raise

    @app.task(bind=True, bulkhead=POOL, name="fleet.ping", shared=False)
    def ping(self: Any, tag: str) -> None:
        """Touch nothing: tells the test that this node consumes."""
        record(self, "pong", tag)

    return app


def _from_environment() -> Celery:
    env = os.environ
    port = env.get("BULKHEAD_TEST_METRICS_PORT")
    timeout = env.get("BULKHEAD_TEST_PUBLISH_TIMEOUT")
    limit = env.get("BULKHEAD_TEST_TIME_LIMIT")
    return make_fleet_app(
        env.get("BULKHEAD_TEST_BROKER", RECORDS_URL),
        env.get("BULKHEAD_TEST_PREFIX", "bulkhead-test"),
        breaker=json.loads(env.get("BULKHEAD_TEST_BREAKER", "{}")),
        state_url=env.get("BULKHEAD_TEST_STATE_URL", RECORDS_URL),
        worker_pool=env.get("BULKHEAD_TEST_WORKER_POOL", "prefork"),
        concurrency=int(env.get("BULKHEAD_TEST_CONCURRENCY", "4")),
        capped=env.get("BULKHEAD_TEST_CAPPED", "1") == "1",
        metrics_port=int(port) if port else None,
        publish_timeout=float(timeout) if timeout else None,
        results=env.get("BULKHEAD_TEST_RESULTS") == "1",
        time_limit=float(limit) if limit else None,
    )


app = _from_environment()
