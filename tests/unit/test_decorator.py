"""``@app.task(bulkhead=...)`` keeps a task in its pool."""

from __future__ import annotations

import pytest
from celery import Celery

from celery_bulkhead import Bulkhead, ConfigurationError, Pool


def test_a_pool_task_with_its_own_queue_is_refused_at_decoration() -> None:
    """Celery lets a task's ``queue=`` beat every router: it would escape its pool's cap."""
    app = Celery("decorator", broker="memory://", set_as_current=False)
    Bulkhead(app, pools=[Pool("webhooks", max_queue=5)])
    with pytest.raises(ConfigurationError) as info:

        @app.task(bulkhead="webhooks", queue="elsewhere", shared=False, name="d.deliver")
        def deliver() -> None: ...

    assert (info.value.pool, info.value.setting, info.value.value) == (
        "webhooks",
        "queue",
        "elsewhere",
    )
    assert "task 'd.deliver'" in str(info.value)


def test_a_pool_task_is_published_to_its_pools_queue() -> None:
    app = Celery("decorator-ok", broker="memory://", set_as_current=False)
    Bulkhead(app, pools=[Pool("webhooks")])

    @app.task(bulkhead="webhooks", shared=False, name="d.ok")
    def ok() -> None: ...

    route = app.amqp.router.route({}, "d.ok")
    assert route["queue"].name == "bulkhead.webhooks"
