"""The Celery app and its pools.

Three kinds of work that should not hurt each other:

* ``payments``: few, important, talk to a payment provider;
* ``webhooks``: many, I/O-bound, and the receiving end is sometimes slow;
* ``reports``: rare, long-running, and fine to wait.

Each pool gets its own queue (``bulkhead.<pool>``) and its own worker, so a
pile of slow webhooks cannot take the slots payments need.

The broker is ``$CELERY_BROKER_URL`` (Redis on loopback when it is unset) and
the result backend ``$CELERY_RESULT_BACKEND``, else the broker itself on Redis
or ``rpc://`` on RabbitMQ.  Celery lets both variables override an app's own
settings anyway; reading them here makes the defaults visible.
"""

import os

from celery import Celery

from celery_bulkhead import Bulkhead, Pool

BROKER_URL = os.environ.get("CELERY_BROKER_URL") or "redis://127.0.0.1:6379/0"
RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND") or (
    BROKER_URL if BROKER_URL.startswith(("redis://", "rediss://")) else "rpc://"
)

app = Celery("shop", broker=BROKER_URL, backend=RESULT_BACKEND, include=["shop.tasks"])

bulkhead = Bulkhead(
    app,
    pools=[
        # Prefork processes, so the time limits are enforced.
        Pool("payments", concurrency=4, time_limit=30, soft_time_limit=25, drain_timeout=30),
        # Threads suit I/O-bound work; Celery's threads pool ignores time
        # limits, so none are set here (use the HTTP client's timeout instead).
        Pool("webhooks", concurrency=16, worker_pool="threads", drain_timeout=10),
        # Any task whose name matches "reports.*" lands here, no decorator needed.
        Pool(
            "reports",
            concurrency=2,
            tasks=["reports.*"],
            time_limit=600,
            soft_time_limit=540,
            drain_timeout=60,
        ),
    ],
)
