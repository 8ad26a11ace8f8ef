"""The runtime side of tenant limits: the store, fail modes, throttle bookkeeping.

One :class:`Limiter` per ``Bulkhead``, shared by admission (producers) and
the worker gate.  The store is chosen once from the settings
(``bulkhead_state_url``): ``memory://`` is the in-process
:class:`~.memory.MemoryStore`, anything else the Redis store, imported only
then (redis-py is an optional dependency).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from . import bucket_key, lease_key
from .bucket import Take
from .memory import MemoryStore

if TYPE_CHECKING:
    from celery import Celery

    from ..pool import Pool

__all__ = ["Limiter", "same_redis"]

logger = logging.getLogger("celery_bulkhead.tenants")

_LOG_EVERY = 10.0
#: The share of the publish deadline one state-store call may take: a publish
#: that fails open (``on_state_error="allow"``) after the store timed out still
#: has the rest of its deadline to reach the broker.
STATE_SHARE = 0.5


def _where(url: str) -> tuple[str, int, str] | None:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return None
    db = parts.path.strip("/") or "0"
    return (parts.hostname or "localhost", parts.port or 6379, db)


def same_redis(state_url: str, app: Celery) -> bool:
    """Whether the tenant state lives in the broker's own Redis (same host, port and db)."""
    broker = app.conf.broker_write_url or app.conf.broker_url or ""
    if isinstance(broker, (list, tuple)):
        broker = broker[0] if broker else ""
    state = _where(state_url)
    return state is not None and state == _where(str(broker).split(";", 1)[0])


class Limiter:
    """Tenant buckets and leases in one store, with the limit's fail mode on store errors."""

    def __init__(self, state_url: str, timeout: float) -> None:
        """``timeout``: the publish deadline; a store call may take ``STATE_SHARE`` of it."""
        self.state_url = state_url
        self.timeout = timeout
        self._store: Any = None
        self._errors: tuple[type[BaseException], ...] = ()
        self._lock = threading.Lock()
        self._last_log: dict[tuple[str, str], tuple[float, int]] = {}

    @property
    def store(self) -> Any:
        if self._store is None:
            with self._lock:
                if self._store is None:
                    if self.state_url.startswith("memory://"):
                        self._errors = ()
                        self._store = MemoryStore()
                    else:
                        from .redis import STATE_ERRORS, RedisStore

                        self._errors = STATE_ERRORS
                        self._store = RedisStore(self.state_url, self.timeout * STATE_SHARE)
        return self._store

    def take(self, pool: Pool, tenant: str, horizon: float = 0.0) -> Take | None:
        """Spend one of ``tenant``'s tokens in ``pool``; None when the store cannot answer."""
        limit = pool.tenant
        assert limit is not None and limit.burst is not None
        store = self.store
        try:
            result: Take = store.take(
                bucket_key(pool.name, tenant), limit.interval, limit.burst, horizon
            )
        except self._errors as exc:
            self.state_error(pool, "take", exc)
            return None
        return result

    def lease(
        self, pool: Pool, tenant: str, member: str, seconds: float
    ) -> tuple[bool, float] | None:
        """Take (or renew) an in-flight slot of ``tenant``; None if the store cannot answer."""
        limit = pool.tenant
        assert limit is not None and limit.max_inflight is not None
        store = self.store
        try:
            held: tuple[bool, float] = store.lease(
                lease_key(pool.name, tenant), member, limit.max_inflight, seconds
            )
        except self._errors as exc:
            self.state_error(pool, "lease", exc)
            return None
        return held

    def release(self, pool: Pool, tenant: str, member: str) -> None:
        """Give an in-flight slot back (best effort: an unreleased lease expires)."""
        store = self.store
        try:
            store.release(lease_key(pool.name, tenant), member)
        except self._errors as exc:
            self.state_error(pool, "release", exc)

    def note_throttled(self, pool: Pool, tenant: str) -> None:
        """Rank ``tenant`` among the pool's most throttled (best effort)."""
        store = self.store
        try:
            store.note_throttled(pool.name, tenant)
        except self._errors as exc:
            self.state_error(pool, "rank", exc)

    def most_throttled(self, pool: Pool, count: int = 5) -> list[tuple[str, int]]:
        result: list[tuple[str, int]] = self.store.most_throttled(pool.name, count)
        return result

    def state_error(self, pool: Pool, operation: str, exc: BaseException) -> None:
        """Log a store failure, at most once per pool and operation every 10 s."""
        key = (pool.name, operation)
        now = time.monotonic()
        with self._lock:
            last, pending = self._last_log.get(key, (-_LOG_EVERY, 0))
            pending += 1
            if now - last < _LOG_EVERY:
                self._last_log[key] = (last, pending)
                return
            self._last_log[key] = (now, 0)
        logger.warning(
            "celery-bulkhead: pool %r: tenant state unavailable (%s: %s); %d time(s) since the "
            "last report; applying on_state_error",
            pool.name,
            operation,
            type(exc).__name__,
            pending,
        )
