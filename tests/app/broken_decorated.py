"""An app whose included task module decorates a task into a misspelt pool."""

from celery import Celery

from celery_bulkhead import Bulkhead, Pool

app = Celery(
    "broken_decorated",
    broker="memory://",
    include=["tests.app.broken_decorated_tasks"],
    set_as_current=False,
)
bulkhead = Bulkhead(app, pools=[Pool("payments"), Pool("reports")])
