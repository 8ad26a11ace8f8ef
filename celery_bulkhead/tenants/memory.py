"""The in-process store: tenant buckets and leases for one process (``memory://`` apps).

The same operations as :mod:`.redis`, under one lock, with this process's
monotonic clock.  For users' own tests, where the broker is ``memory://``
and the producer and the worker share a process.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

from .bucket import Take, take

__all__ = ["MemoryStore"]

_THROTTLED_KEPT = 200


class MemoryStore:
    """Buckets and leases in a dict; every entry expires like its Redis twin."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._tats: dict[str, float] = {}  # the stored tat is also the entry's expiry
        self._leases: dict[str, dict[str, float]] = {}
        self._throttled: dict[str, Counter[str]] = {}

    def take(self, key: str, interval: float, burst: int, horizon: float = 0.0) -> Take:
        now = self.clock()
        with self._lock:
            tat = self._tats.get(key)
            if tat is not None and tat <= now:
                del self._tats[key]  # expired: the bucket is full again
                tat = None
            result = take(tat, now, interval, burst, horizon)
            if result.allowed:
                self._tats[key] = result.tat
        return result

    def lease(self, key: str, member: str, limit: int, seconds: float) -> tuple[bool, float]:
        now = self.clock()
        with self._lock:
            leases = {m: e for m, e in self._leases.get(key, {}).items() if e > now}
            if member not in leases and len(leases) >= limit:
                self._leases[key] = leases
                return False, min(leases.values()) - now
            leases[member] = now + seconds
            self._leases[key] = leases
        return True, 0.0

    def release(self, key: str, member: str) -> None:
        with self._lock:
            leases = self._leases.get(key)
            if leases is not None:
                leases.pop(member, None)
                if not leases:
                    del self._leases[key]

    def note_throttled(self, pool: str, tenant: str) -> None:
        with self._lock:
            counts = self._throttled.setdefault(pool, Counter())
            counts[tenant] += 1
            if len(counts) > _THROTTLED_KEPT:
                for name, _ in counts.most_common()[_THROTTLED_KEPT:]:
                    del counts[name]

    def most_throttled(self, pool: str, count: int) -> list[tuple[str, int]]:
        with self._lock:
            return self._throttled.get(pool, Counter()).most_common(count)

    def size(self) -> int:
        """Live entries (buckets and lease sets), for tests of expiry."""
        now = self.clock()
        with self._lock:
            return sum(1 for tat in self._tats.values() if tat > now) + sum(
                1 for leases in self._leases.values() if any(e > now for e in leases.values())
            )
