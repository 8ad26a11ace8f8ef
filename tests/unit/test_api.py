"""The public API is small and pinned."""

from __future__ import annotations

from kombu.exceptions import OperationalError

import celery_bulkhead
from celery_bulkhead import BrokerUnavailable, BulkheadError, ConfigurationError, PoolFull, Rejected


def test_public_api_is_pinned() -> None:
    assert celery_bulkhead.__all__ == [
        "BrokerUnavailable",
        "Bulkhead",
        "BulkheadError",
        "ConfigurationError",
        "DroppedResult",
        "Pool",
        "PoolFull",
        "Rejected",
    ]
    assert celery_bulkhead.__all__ == sorted(celery_bulkhead.__all__)


def test_every_error_has_one_root() -> None:
    assert issubclass(ConfigurationError, BulkheadError)
    # A ConfigurationError is also a ValueError, so generic handlers see a bad value.
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(PoolFull, Rejected) and issubclass(Rejected, BulkheadError)
    assert issubclass(BrokerUnavailable, BulkheadError)
    assert issubclass(BrokerUnavailable, OperationalError)
