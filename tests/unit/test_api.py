"""The public API is small and pinned."""

from __future__ import annotations

from kombu.exceptions import OperationalError

import celery_bulkhead
from celery_bulkhead import (
    BrokerUnavailable,
    BulkheadError,
    CircuitOpen,
    ConfigurationError,
    PoolFull,
    Rejected,
    TenantLimited,
)


def test_public_api_is_pinned() -> None:
    assert celery_bulkhead.__all__ == [
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
    assert celery_bulkhead.__all__ == sorted(celery_bulkhead.__all__)


def test_every_error_has_one_root() -> None:
    assert issubclass(ConfigurationError, BulkheadError)
    # A ConfigurationError is also a ValueError, so generic handlers see a bad value.
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(PoolFull, Rejected) and issubclass(Rejected, BulkheadError)
    assert issubclass(TenantLimited, Rejected)
    assert issubclass(CircuitOpen, Rejected)
    assert issubclass(BrokerUnavailable, BulkheadError)
    assert issubclass(BrokerUnavailable, OperationalError)
