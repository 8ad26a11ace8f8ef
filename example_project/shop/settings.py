"""The shop's Celery settings, read by ``app.config_from_object("shop.settings")``.

This is where a team keeps its configuration, as a Django project keeps it in
``settings.py`` (there every name takes the ``CELERY_`` prefix:
``CELERY_BULKHEAD_POOLS``, ``CELERY_BULKHEAD_METRICS_PORT``...).  The pools
are plain data, validated when ``Bulkhead(app)`` is built: a bad value fails
at start with a ``ConfigurationError`` naming the pool and the setting.

Environment variables, all optional:

``CELERY_BROKER_URL``      the broker (default: Redis database 0 on loopback)
``CELERY_RESULT_BACKEND``  the results (default: the broker on Redis, ``rpc://`` otherwise)
``BULKHEAD_STATE_URL``     the Redis holding tenant buckets and breaker state
                           (default: the broker's Redis; required on RabbitMQ)
``SHOP_WEBHOOK_URL``       where webhooks are POSTed (default: ``receiver.py`` on loopback)
``SHOP_METRICS_PORT``      the payments worker's metrics port; webhooks +1, reports +2
``SHOP_QUEUE_PREFIX``      prepended to every queue name (default: none), so that
                           several copies of the shop can share one broker (the tests)
"""

from __future__ import annotations

import os

from celery.exceptions import Retry

from shop.delivery import ReceiverRefused

broker_url = os.environ.get("CELERY_BROKER_URL") or "redis://127.0.0.1:6379/0"
result_backend = os.environ.get("CELERY_RESULT_BACKEND") or (
    broker_url if broker_url.startswith(("redis://", "rediss://")) else "rpc://"
)
result_expires = 3600
imports = ("shop.tasks", "shop.reports")
broker_connection_retry_on_startup = True

_prefix = os.environ.get("SHOP_QUEUE_PREFIX", "")
# Tasks in no pool (send_receipt) keep Celery's routing, to this queue.
task_default_queue = f"{_prefix}celery"

bulkhead_pools = {
    # The money path: few tasks, each one matters, the provider can be slow.
    # Its own 4 processes mean no webhook or report can take a payment's slot.
    # A full queue means the workers are far behind: refuse at once
    # (PoolFull) so the web page can say so, rather than take an order
    # that would be charged an hour late.
    "payments": {
        "queue": f"{_prefix}bulkhead.payments",
        "concurrency": 4,
        "time_limit": 30,
        "soft_time_limit": 25,
        "max_queue": 1_000,
        "on_full": "reject",
        "drain_timeout": 30,
    },
    # Outgoing webhooks: many, I/O-bound, and at the mercy of a receiver we
    # do not run.  Threads, because they wait on the network; the threads pool
    # ignores time limits, so the HTTP timeout (shop.tasks) bounds each call.
    "webhooks": {
        "queue": f"{_prefix}bulkhead.webhooks",
        "concurrency": 16,
        "worker_pool": "threads",
        "max_queue": 5_000,
        # A notification is worth less than the page that triggered it:
        # beyond 5,000 waiting, drop it (counted) instead of failing the page.
        "on_full": "drop",
        "drain_timeout": 10,
        # One tenant's burst (an import of 10,000 orders) must not hold the
        # other tenants' webhooks: 10/s each, 20 at once from quiet, and at
        # most 4 of the 16 threads.
        "tenant": {"key": "tenant_id", "rate": "10/s", "burst": 20, "max_inflight": 4},
        # When the receiver is down, stop calling it fleet-wide: after 5
        # failures in a minute, wait 30 s, then try one call.
        "breaker": {
            "fail_max": 5,
            "reset_timeout": 30,
            # A 4xx is our request being wrong, not the receiver being down.
            "exclude": (ReceiverRefused,),
            # deliver_webhook retries a 5xx (autoretry_for), and a retry is
            # Celery control flow that a breaker ignores by default: count it,
            # or the breaker would only see a failure after the last retry.
            "include": (Retry,),
            # Let the web page know at once while the receiver is down.
            "fail_fast_at_submit": True,
        },
    },
    # Reports: rare, slow (minutes), and fine to wait.  Two processes, so a
    # month-end rush cannot take the CPU the payments need.  The tasks are
    # routed by name ("shop.reports.*"): the report module needs no decorator.
    "reports": {
        "queue": f"{_prefix}bulkhead.reports",
        "concurrency": 2,
        "tasks": ["shop.reports.*"],
        "time_limit": 600,
        "soft_time_limit": 540,
        "max_queue": 100,
        # A user asking for a report can wait a few seconds for room.
        "on_full": "block",
        "block_timeout": 5,
        "drain_timeout": 60,
    },
}

# Pool i serves its metrics on this port + i: payments 9808, webhooks 9809,
# reports 9810 (on 127.0.0.1; bulkhead_metrics_host to bind elsewhere).
bulkhead_metrics_port = int(os.environ.get("SHOP_METRICS_PORT") or 9808)
# None: the broker's Redis.  A RabbitMQ shop must name a Redis here, because
# the webhooks pool's tenant limit and breaker keep their state in one.
bulkhead_state_url = os.environ.get("BULKHEAD_STATE_URL") or None

# Not a Celery setting: the shop's own, read by shop.tasks.deliver_webhook.
shop_webhook_url = os.environ.get("SHOP_WEBHOOK_URL") or "http://127.0.0.1:8080/webhooks"
shop_webhook_timeout = 10.0
