"""Celery apps for ``bench/isolation.py``: the same two tasks, two ways.

* ``bulkhead_app``: celery_bulkhead pools ``fast`` (threads, 4) and ``slow``
  (threads, 4), each with its own queue; workers are started with
  ``celery -A isolation_app:bulkhead_app bulkhead worker``.
* ``plain_app``: no celery_bulkhead; both tasks go to one queue, served by
  one ``celery -A isolation_app:plain_app worker -P threads -c 8``.

The broker URL, the records Redis and the name prefix come from the
environment the runner sets (``BENCH_BROKER_URL``, ``BENCH_RECORDS_URL``,
``BENCH_PREFIX``); the producer builds its own apps
with :func:`make_bulkhead_app` / :func:`make_plain_app` and the same prefix.

Both tasks take ``(seq, submitted_at, seconds)``, sleep ``seconds`` and then
append ``[task kind, seq, submitted_at, done_at]`` (wall-clock seconds) to
the list ``<prefix>:<kind>`` in the records Redis; a negative ``seq`` is a warm-up and goes
to ``<prefix>:warm`` instead.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from _runner import (
    ENV_BROKER,
    ENV_PREFIX,
    celery_settings,
    default_broker_url,
    records_url_for,
)
from celery import Celery

from celery_bulkhead import Bulkhead, Pool

__all__ = [
    "FAST_CONCURRENCY",
    "FAST_TASK",
    "PLAIN_CONCURRENCY",
    "SLOW_CONCURRENCY",
    "SLOW_TASK",
    "bulkhead_app",
    "make_bulkhead_app",
    "make_plain_app",
    "plain_app",
    "records_key",
]

FAST_TASK = "bench.isolation.fast"
SLOW_TASK = "bench.isolation.slow"
FAST_CONCURRENCY = 4
SLOW_CONCURRENCY = 4
#: The plain worker gets the bulkhead pools' total, so (c) is not short of threads.
PLAIN_CONCURRENCY = FAST_CONCURRENCY + SLOW_CONCURRENCY


def records_key(prefix: str, kind: str) -> str:
    """The Redis list the tasks of ``kind`` (``fast``, ``slow``, ``warm``) append to."""
    return f"{prefix}:{kind}"


def _define_tasks(
    app: Celery,
    broker_url: str,
    prefix: str,
    fast_options: dict[str, Any],
    slow_options: dict[str, Any],
) -> None:
    records = redis.Redis.from_url(records_url_for(broker_url))

    def record(kind: str, seq: int, submitted_at: float) -> None:
        key = records_key(prefix, "warm" if seq < 0 else kind)
        records.rpush(key, json.dumps([kind, seq, submitted_at, time.time()]))

    # shared=False: two apps in one process register the same task names.
    @app.task(name=FAST_TASK, shared=False, **fast_options)
    def fast(seq: int, submitted_at: float, seconds: float) -> None:
        """The latency-sensitive task: a short call (10 ms in the bench)."""
        time.sleep(seconds)
        record("fast", seq, submitted_at)

    @app.task(name=SLOW_TASK, shared=False, **slow_options)
    def slow(seq: int, submitted_at: float, seconds: float) -> None:
        """A call to a hung downstream: blocks its worker slot (2 s in the bench)."""
        time.sleep(seconds)
        record("slow", seq, submitted_at)


def make_bulkhead_app(broker_url: str, prefix: str) -> Celery:
    app = Celery("isolation_bulkhead", broker=broker_url, set_as_current=False)
    app.conf.update(celery_settings(broker_url, prefix))
    Bulkhead(
        app,
        pools=[
            Pool(
                "fast",
                concurrency=FAST_CONCURRENCY,
                queue=f"{prefix}.fast",
                worker_pool="threads",
                drain_timeout=10,
            ),
            Pool(
                "slow",
                concurrency=SLOW_CONCURRENCY,
                queue=f"{prefix}.slow",
                worker_pool="threads",
                # Its tasks sleep 2 s: a warm shutdown finishes well inside this.
                drain_timeout=10,
            ),
        ],
    )
    _define_tasks(app, broker_url, prefix, {"bulkhead": "fast"}, {"bulkhead": "slow"})
    return app


def make_plain_app(broker_url: str, prefix: str) -> Celery:
    app = Celery("isolation_plain", broker=broker_url, set_as_current=False)
    settings = celery_settings(broker_url, prefix)
    # Every task on one queue: Celery's default routing.
    queue = f"{prefix}.plain"
    settings.update(
        task_default_queue=queue, task_default_exchange=queue, task_default_routing_key=queue
    )
    app.conf.update(settings)
    _define_tasks(app, broker_url, prefix, {}, {})
    return app


_broker_url = os.environ.get(ENV_BROKER) or default_broker_url()
_prefix = os.environ.get(ENV_PREFIX, "bench-isolation")
bulkhead_app = make_bulkhead_app(_broker_url, _prefix)
plain_app = make_plain_app(_broker_url, _prefix)
