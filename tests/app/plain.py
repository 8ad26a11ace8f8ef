"""A Celery app with no Bulkhead declared."""

from celery import Celery

app = Celery("plain", broker="memory://", set_as_current=False)
