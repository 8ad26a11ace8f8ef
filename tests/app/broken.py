"""An app whose included task module names a pool that does not exist."""

from celery import Celery

from celery_bulkhead import Bulkhead, Pool

app = Celery("broken", broker="memory://", include=["tests.app.broken_tasks"], set_as_current=False)
bulkhead = Bulkhead(app, pools=[Pool("io")])
