"""A one-pool app for submit-side tenant-limit tests, and the producer process that floods it.

``make_limited_app`` builds an app whose only pool (named by the test, so its
tenant keys are the test's own) limits tenants with the given
``TenantLimit`` settings.  :func:`hammer` is the body of one flooding producer
process: it builds its own app, waits at a barrier with the others, then
publishes for one tenant as fast as it can and reports when each admitted
publish started and ended.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from celery_bulkhead import Bulkhead, Pool, TenantLimit, TenantLimited

TASK = "tenant_limits.work"


def make_limited_app(
    broker_url: str,
    prefix: str,
    pool: str,
    *,
    state_url: str,
    publish_timeout: float = 5.0,
    max_queue: int | None = None,
    **limit: Any,
) -> Celery:
    """An app with one pool ``pool`` (queue ``<prefix>.limited``) limited per tenant."""
    app = Celery(f"tenant-limits-{pool}", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        task_default_queue=f"{prefix}.default",
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 60},
        broker_heartbeat=0,
        bulkhead_state_url=state_url,
    )
    Bulkhead(
        app,
        pools=[
            Pool(
                pool,
                queue=f"{prefix}.limited",
                max_queue=max_queue,
                tenant=TenantLimit("tenant", **limit),
            )
        ],
        publish_timeout=publish_timeout,
    )

    @app.task(name=TASK, bulkhead=pool, shared=False)
    def work(tenant: Any = None, n: int = 0) -> int:
        return n

    return app


def hammer(
    app_args: tuple[Any, ...],
    app_kwargs: dict[str, Any],
    tenant: str,
    duration: float,
    barrier: Any,
    results: Any,
) -> None:
    """One producer process: publish ``tenant``'s task for ``duration`` s, flat out.

    Puts ``(admitted, refused, last_refused, errors)`` on ``results``: the
    (start, end) monotonic times of each admitted publish, how many were
    refused and when the last refused one started, and a count of errors.
    """
    admitted: list[tuple[float, float]] = []
    refused = errors = 0
    last_refused = 0.0
    try:
        try:
            app = make_limited_app(*app_args, **app_kwargs)
            task = app.tasks[TASK]
            task.delay(tenant=f"warm-up-{os.getpid()}")  # connected, scripts loaded
        except BaseException:
            barrier.abort()  # the others (and the test) stop waiting at once
            raise
        barrier.wait(timeout=60)
        until = time.monotonic() + duration
        while (started := time.monotonic()) < until:
            try:
                task.delay(tenant=tenant)
            except TenantLimited:
                refused += 1
                last_refused = started
                continue
            except Exception:
                errors += 1
                continue
            admitted.append((started, time.monotonic()))
    finally:
        results.put((admitted, refused, last_refused, errors))
