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


#: Packed bucket commands kept (one per tenant, limit and horizon seen lately).
_COMMANDS_KEPT = 10_000


class _Local(threading.local):
    """A thread's own connection to the state Redis, and the process that made it."""

    pid: int | None = None


class _Command:
    """One tenant's bucket call: its script and arguments, packed once."""

    __slots__ = ("args", "packed", "script")

    def __init__(self, script: scripts.Script, args: tuple[bytes, ...]) -> None:
        self.script = script
        self.args = args
        self.packed = scripts.pack(b"EVALSHA", script.sha, *args)


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
        self._local = _Local()
        self._take_commands: dict[tuple[str, float, int, float], _Command] = {}

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
        """Spend one token (GCRA, ``lua/bucket.lua``): one round trip."""
        command = self._command(key, interval, burst, horizon)
        answer = scripts.call(self._connection(), command.script, command.args, command.packed)
        wait = int(answer) / 1_000_000
        return Take(wait >= 0, 0.0, abs(wait))

    def _command(self, key: str, interval: float, burst: int, horizon: float) -> _Command:
        cache_key = (key, interval, burst, horizon)
        command = self._take_commands.get(cache_key)
        if command is None:
            if len(self._take_commands) >= _COMMANDS_KEPT:
                self._take_commands.clear()  # tenants are unbounded: so is nothing here
            numbers = (max(1, round(interval * 1_000_000)), burst, round(horizon * 1_000_000))
            args = (b"1", key.encode(), *(str(number).encode() for number in numbers))
            command = self._take_commands[cache_key] = _Command(scripts.load("bucket"), args)
        return command

    def _connection(self) -> Any:
        """This thread's own connection to the state Redis, for :func:`scripts.call`.

        Made from the client's settings (URL, TLS, auth, timeouts) and kept
        per thread: the hot path's one call skips redis-py's client layers.
        """
        local = self._local
        conn = local.__dict__.get("conn")
        if conn is None or local.pid != os.getpid():
            conn = local.conn = scripts.connection(self.client.connection_pool)
            local.pid = os.getpid()
        return conn

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
