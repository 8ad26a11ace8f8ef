"""Celery apps for ``bench/publish.py``: one no-op task, with and without a cap.

* :func:`make_plain_app`: no celery_bulkhead; the task goes to the app's
  default queue ``<prefix>.plain`` (Celery's own routing and publish path).
  ``confirm=True`` adds ``broker_transport_options={"confirm_publish": True}``
  (RabbitMQ publisher confirms; the Redis transport ignores it).
* :func:`make_capped_app`: the same task in a celery_bulkhead pool
  ``capped`` with ``max_queue=CAP`` on queue ``<prefix>.capped``, so every
  publish goes through admission (Redis: the capped-push Lua script in place
  of LPUSH; RabbitMQ: an ``x-max-length`` queue and a publisher-confirm
  connection) but is never refused.

Both apps use the runner's :func:`celery_settings` (no results, json, the
Redis ``global_keyprefix``), so the only difference is celery_bulkhead.
Nothing consumes the messages: the bench deletes the queues instead.
"""

from __future__ import annotations

from typing import Any

from _runner import celery_settings
from celery import Celery

from celery_bulkhead import Bulkhead, Pool

__all__ = ["CAP", "NOOP_TASK", "make_capped_app", "make_plain_app", "queue_name"]

NOOP_TASK = "bench.publish.noop"
#: Far above anything a round publishes: admission runs, never refuses.
CAP = 10_000_000


def queue_name(prefix: str, kind: str) -> str:
    """The broker queue of an app kind (``plain`` or ``capped``)."""
    return f"{prefix}.{kind}"


def _settings(broker_url: str, prefix: str) -> dict[str, Any]:
    settings = celery_settings(broker_url, prefix)
    settings.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
    )
    return settings


def _define_task(app: Celery, **options: Any) -> None:
    # shared=False: several apps in one process register the same task name.
    @app.task(name=NOOP_TASK, shared=False, **options)
    def noop() -> None:
        """Does nothing; only its publish is measured."""


def make_plain_app(broker_url: str, prefix: str, *, confirm: bool = False) -> Celery:
    app = Celery("publish_plain", broker=broker_url, set_as_current=False)
    settings = _settings(broker_url, prefix)
    queue = queue_name(prefix, "plain")
    settings.update(
        task_default_queue=queue, task_default_exchange=queue, task_default_routing_key=queue
    )
    if confirm:
        options = dict(settings.get("broker_transport_options") or {})
        options["confirm_publish"] = True
        settings["broker_transport_options"] = options
    app.conf.update(settings)
    _define_task(app)
    return app


def make_capped_app(broker_url: str, prefix: str) -> Celery:
    app = Celery("publish_capped", broker=broker_url, set_as_current=False)
    app.conf.update(_settings(broker_url, prefix))
    Bulkhead(app, pools=[Pool("capped", max_queue=CAP, queue=queue_name(prefix, "capped"))])
    _define_task(app, bulkhead="capped")
    return app
