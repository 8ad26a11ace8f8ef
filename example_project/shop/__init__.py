"""The example shop: a Celery app with three bulkhead pools.

``celery -A shop ...`` finds the app here.
"""

from .celery import app

__all__ = ["app"]
