"""The Redis store: tenant buckets and leases shared by the fleet.

Each operation is one Lua call (``lua/bucket.lua``, ``lua/lease.lua``) on
Redis server time, with every key in ``KEYS`` carrying its tenant's
``{hash tag}`` and a TTL no longer than the state it holds (a full refill
for a bucket, the last lease for a lease set).  The client is created
lazily, once per process (after fork), with socket timeouts of the
publish deadline and no retries of its own, so a frozen or stopped Redis
is noticed within that deadline.

Redis-only: imports redis-py; loaded only when a Redis state store is used.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import scripts
from .bucket import Take

__all__ = ["STATE_ERRORS", "THROTTLED_TTL", "RedisStore"]

#: How long the most-throttled ranking remembers a pool's throttles (seconds).
THROTTLED_TTL = 600
_THROTTLED_KEPT = 200
#: What a store call raises when Redis cannot be reached in time.
STATE_ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)


def throttled_key(pool: str) -> str:
    return f"bulkhead:{{{pool}}}:throttled"


class RedisStore:
    """Buckets and leases in Redis, one Lua call per operation."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._client: Any = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    self._client = redis.Redis.from_url(
                        self.url,
                        socket_timeout=self.timeout,
                        socket_connect_timeout=self.timeout,
                        retry=Retry(NoBackoff(), 0),
                    )
                    self._pid = os.getpid()
        return self._client

    def take(self, key: str, interval: float, burst: int, horizon: float = 0.0) -> Take:
        script = scripts.load("bucket")
        allowed, wait = scripts.run(
            self.client,
            script,
            b"1",
            key,
            max(1, round(interval * 1_000_000)),
            burst,
            round(horizon * 1_000_000),
        )
        return Take(bool(allowed), 0.0, max(0.0, int(wait) / 1_000_000))

    def lease(self, key: str, member: str, limit: int, seconds: float) -> tuple[bool, float]:
        script = scripts.load("lease")
        held, wait = scripts.run(
            self.client, script, b"1", key, member, limit, max(1, round(seconds * 1000))
        )
        return bool(held), max(0.0, int(wait) / 1000)

    def release(self, key: str, member: str) -> None:
        self.client.zrem(key, member)

    def note_throttled(self, pool: str, tenant: str) -> None:
        key = throttled_key(pool)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zincrby(key, 1, tenant)
            pipe.zremrangebyrank(key, 0, -(_THROTTLED_KEPT + 1))
            pipe.expire(key, THROTTLED_TTL)
            pipe.execute()

    def most_throttled(self, pool: str, count: int) -> list[tuple[str, int]]:
        if count <= 0:
            return []  # ZREVRANGE 0 -1 would be the whole ranking
        rows = self.client.zrevrange(throttled_key(pool), 0, count - 1, withscores=True)
        return [(name.decode("utf-8", "replace"), int(score)) for name, score in rows]
