"""celery-bulkhead: the bulkhead pattern for Celery.

Declare pools on an app; each pool gets its own queue and its own workers, so
one slow dependency or one flood of work cannot take another pool's slots::

    from celery_bulkhead import Bulkhead, Pool

    bulkhead = Bulkhead(app, pools=[Pool("payments", concurrency=4, time_limit=30)])

    @app.task(bulkhead="payments")
    def charge(order_id: int) -> None: ...

Then run ``celery -A app bulkhead worker``.
"""

from .bulkhead import Bulkhead
from .errors import BrokerUnavailable, BulkheadError, ConfigurationError, PoolFull, Rejected
from .pool import Pool
from .results import DroppedResult

__all__ = [
    "BrokerUnavailable",
    "Bulkhead",
    "BulkheadError",
    "ConfigurationError",
    "DroppedResult",
    "Pool",
    "PoolFull",
    "Rejected",
]
__version__ = "0.1.0"
