"""The public API is small and pinned."""

from __future__ import annotations

import celery_bulkhead
from celery_bulkhead import BulkheadError, ConfigurationError


def test_public_api_is_pinned() -> None:
    assert celery_bulkhead.__all__ == ["Bulkhead", "BulkheadError", "ConfigurationError", "Pool"]
    assert celery_bulkhead.__all__ == sorted(celery_bulkhead.__all__)


def test_every_error_has_one_root() -> None:
    assert issubclass(ConfigurationError, BulkheadError)
    # A ConfigurationError is also a ValueError, so generic handlers see a bad value.
    assert issubclass(ConfigurationError, ValueError)
