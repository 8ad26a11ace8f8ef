"""An app whose routes, pools and declared queues disagree: ``bulkhead check`` finds each.

Every mistake is one a team adding pools to an existing app can make; the
comments name the finding it produces.
"""

from __future__ import annotations

from celery import Celery

from celery_bulkhead import Breaker, Bulkhead, Pool

app = Celery("tangled", broker="memory://", set_as_current=False)
app.conf.task_routes = {
    "tangled.audit": {"queue": "bulkhead.payments"},  # route-into-pool (error)
    "tangled.notify": {"queue": "bulkhead.payments"},  # shadowed-route (warning)
    "tangled.legacy": "legacy",  # fine: a task in no pool, on a queue of its own
    "reports.*": {"queue": "bulkhead.payments"},  # route-into-pool: matches no task (warning)
}
bulkhead = Bulkhead(
    app,
    pools=[
        Pool("payments", max_queue=100, breaker=Breaker(fail_max=5, reset_timeout=30)),
        Pool("webhooks"),
        Pool("idle"),  # empty-pool (warning)
    ],
)
# Replaced after Bulkhead(app), as a settings module loaded late would:
# queue-not-declared (error) for the continuation queue, and a broker that can
# neither cap a queue nor keep the breaker's state: transport, state-url (errors).
app.conf.task_queues = [q for q in app.conf.task_queues if not q.name.endswith(".continue")]
app.conf.broker_url = "filesystem://"


@app.task(name="tangled.charge", bulkhead="payments", shared=False)
def charge() -> None: ...


@app.task(name="tangled.notify", bulkhead="webhooks", shared=False)
def notify() -> None: ...


@app.task(name="tangled.audit", shared=False)
def audit() -> None: ...


@app.task(name="tangled.legacy", shared=False)
def legacy() -> None: ...


@app.task(name="tangled.sneak", queue="bulkhead.webhooks", shared=False)  # route-into-pool
def sneak() -> None: ...


class Stray(app.Task):  # type: ignore[name-defined,misc]
    """queue-overrides-pool (error): a task class naming a pool and its own queue.

    The decorator refuses ``bulkhead=`` with ``queue=``; a class can still say both.
    """

    name = "tangled.stray"
    bulkhead = "webhooks"
    queue = "elsewhere"

    def run(self) -> None: ...


app.register_task(Stray())
