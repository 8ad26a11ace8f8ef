"""Celery apps for ``bench/worker.py``: the same no-op tasks, with and without a pool.

* ``plain_app`` / :func:`make_plain_app`: no celery_bulkhead; the tasks go to
  the app's default queue ``<prefix>.plain``, served by
  ``celery -A worker_app:plain_app worker -Q <prefix>.plain ...``.
* ``bulkhead_app`` / :func:`make_bulkhead_app`: the same tasks in the
  celery_bulkhead pool ``drain`` (queue ``<prefix>.drain``) with Celery's
  default ``prefetch_multiplier=4`` and ``acks_late=False``, served by the
  same worker command plus ``--bulkhead-pool drain --bulkhead-metrics-port P``.

The broker URL, the records Redis and the name prefix come from the
environment the runner sets (``BENCH_BROKER_URL``, ``BENCH_RECORDS_URL``,
``BENCH_PREFIX``); the pool's execution pool and
concurrency from ``BENCH_WORKER_POOL`` / ``BENCH_CONCURRENCY`` (they only
show up in the bootstep's metrics and ``info()``; the worker command line
sets ``-P``/``-c`` for both apps alike).

``noop`` does nothing.  ``mark`` is published after the no-ops and writes its
wall-clock run time (``time.time()``) to the Redis key ``<prefix>:mark``:
the queue is FIFO and one worker drains it, so when ``mark`` runs every no-op
has been taken and (with at most ``concurrency - 1`` still finishing) run.
"""

from __future__ import annotations

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
    "ENV_CONCURRENCY",
    "ENV_WORKER_POOL",
    "MARK_TASK",
    "NOOP_TASK",
    "POOL_NAME",
    "PREFETCH_MULTIPLIER",
    "bulkhead_app",
    "make_bulkhead_app",
    "make_plain_app",
    "mark_key",
    "plain_app",
    "queue_name",
]

NOOP_TASK = "bench.worker.noop"
MARK_TASK = "bench.worker.mark"
POOL_NAME = "drain"
#: Celery's default worker_prefetch_multiplier; the pool gets the same.
PREFETCH_MULTIPLIER = 4
ENV_WORKER_POOL = "BENCH_WORKER_POOL"
ENV_CONCURRENCY = "BENCH_CONCURRENCY"


def queue_name(prefix: str, kind: str) -> str:
    """The broker queue of an app kind (``plain`` or ``bulkhead``)."""
    return f"{prefix}.{'plain' if kind == 'plain' else POOL_NAME}"


def mark_key(prefix: str) -> str:
    """The key in the records Redis the ``mark`` task writes its run time to."""
    return f"{prefix}:mark"


def _define_tasks(app: Celery, broker_url: str, prefix: str, **options: Any) -> None:
    records = redis.Redis.from_url(records_url_for(broker_url))
    key = mark_key(prefix)

    # shared=False: several apps in one process register the same task names.
    @app.task(name=NOOP_TASK, shared=False, **options)
    def noop() -> None:
        """Does nothing: only the worker's own per-message cost is measured."""

    @app.task(name=MARK_TASK, shared=False, **options)
    def mark() -> None:
        """The last message of a drain: records when it ran."""
        records.set(key, repr(time.time()))


def make_plain_app(broker_url: str, prefix: str) -> Celery:
    app = Celery("worker_plain", broker=broker_url, set_as_current=False)
    settings = celery_settings(broker_url, prefix)
    queue = queue_name(prefix, "plain")
    settings.update(
        task_default_queue=queue, task_default_exchange=queue, task_default_routing_key=queue
    )
    app.conf.update(settings)
    _define_tasks(app, broker_url, prefix)
    return app


def make_bulkhead_app(
    broker_url: str, prefix: str, *, worker_pool: str = "prefork", concurrency: int = 2
) -> Celery:
    app = Celery("worker_bulkhead", broker=broker_url, set_as_current=False)
    app.conf.update(celery_settings(broker_url, prefix))
    Bulkhead(
        app,
        pools=[
            Pool(
                POOL_NAME,
                concurrency=concurrency,
                queue=queue_name(prefix, "bulkhead"),
                worker_pool=worker_pool,
                prefetch_multiplier=PREFETCH_MULTIPLIER,
                acks_late=False,
                drain_timeout=10,
            )
        ],
    )
    _define_tasks(app, broker_url, prefix, bulkhead=POOL_NAME)
    return app


_broker_url = os.environ.get(ENV_BROKER) or default_broker_url()
_prefix = os.environ.get(ENV_PREFIX, "bench-worker")
plain_app = make_plain_app(_broker_url, _prefix)
bulkhead_app = make_bulkhead_app(
    _broker_url,
    _prefix,
    worker_pool=os.environ.get(ENV_WORKER_POOL, "prefork"),
    concurrency=int(os.environ.get(ENV_CONCURRENCY, "2")),
)
