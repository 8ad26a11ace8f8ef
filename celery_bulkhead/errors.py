"""Errors raised by celery-bulkhead.

Every error has one root, so ``except BulkheadError`` catches them all::

    BulkheadError
    └── ConfigurationError     a pool, a setting or a task assignment is invalid

Errors carry data, not only a message: a ``ConfigurationError`` knows the pool,
the setting, the value that was refused and what would have been allowed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BulkheadError", "ConfigurationError"]


class BulkheadError(Exception):
    """Root of every error celery-bulkhead raises."""


class ConfigurationError(BulkheadError, ValueError):
    """A pool, a setting or a task assignment is invalid.

    Raised at construction or decoration time, never at publish time when it
    can be avoided.  The message names the pool (``None`` when the error is
    not about one pool), the setting, the refused value and what is allowed.
    """

    def __init__(
        self,
        pool: str | None,
        setting: str,
        value: Any,
        allowed: str,
        detail: str | None = None,
    ) -> None:
        self.pool = pool
        self.setting = setting
        self.value = value
        self.allowed = allowed
        self.detail = detail
        where = f"pool {pool!r}: " if pool is not None else ""
        message = f"{where}invalid {setting}={value!r}; allowed: {allowed}"
        if detail:
            message = f"{message} ({detail})"
        super().__init__(message)
