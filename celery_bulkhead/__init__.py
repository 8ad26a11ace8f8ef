"""celery-bulkhead: the bulkhead pattern for Celery.

Declare pools on an app; each pool gets its own queue and its own workers, so
one slow dependency or one flood of work cannot take another pool's slots::

    from celery_bulkhead import Bulkhead, Pool

    bulkhead = Bulkhead(app, pools=[Pool("payments", concurrency=4, time_limit=30)])

    @app.task(bulkhead="payments")
    def charge(order_id: int) -> None: ...

Then run ``celery -A app bulkhead worker``.
"""

from .breaker import Breaker
from .bulkhead import Bulkhead
from .errors import (
    BrokerUnavailable,
    BulkheadError,
    CircuitOpen,
    ConfigurationError,
    PoolFull,
    Rejected,
    TenantLimited,
)
from .pool import Pool
from .results import DroppedResult
from .tenants import TenantLimit

__all__ = [
    "Breaker",
    "BrokerUnavailable",
    "Bulkhead",
    "BulkheadError",
    "CircuitOpen",
    "ConfigurationError",
    "DroppedResult",
    "Pool",
    "PoolFull",
    "Rejected",
    "TenantLimit",
    "TenantLimited",
]
__version__ = "0.1.0"
