"""Producer-side metrics, in prometheus_client's default registry.

Created lazily on first use (never at import), so the web app's existing
``/metrics`` endpoint or exporter shows them without any setup.  A failing
metric update is logged and never breaks a publish.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

__all__ = ["DropLog", "count_admission", "count_throttled"]

logger = logging.getLogger("celery_bulkhead.admission")

_lock = threading.Lock()
_admissions: Any = None


def _counter() -> Any:
    global _admissions
    if _admissions is None:
        with _lock:
            if _admissions is None:
                from prometheus_client import Counter

                _admissions = Counter(
                    "celery_bulkhead_admissions",
                    "Publishes of pool tasks by admission decision.",
                    ["pool", "decision", "reason"],
                )
    return _admissions


_children: dict[tuple[str, str, str], Any] = {}


def count_admission(pool: str, decision: str, reason: str) -> None:
    """``celery_bulkhead_admissions_total{pool,decision,reason}`` += 1."""
    try:
        key = (pool, decision, reason)
        child = _children.get(key)
        if child is None:  # pools x decisions x reasons: a small, fixed set
            child = _children[key] = _counter().labels(pool=pool, decision=decision, reason=reason)
        child.inc()
    except Exception:  # a metric must never break a publish
        logger.exception("celery-bulkhead: could not count an admission")


_throttled: Any = None
_throttled_children: dict[tuple[str, str], Any] = {}


def count_throttled(pool: str, side: str) -> None:
    """``celery_bulkhead_tenant_throttled_total{pool,side}`` += 1 (no tenant label, ever)."""
    global _throttled
    try:
        child = _throttled_children.get((pool, side))
        if child is None:
            with _lock:
                if _throttled is None:
                    from prometheus_client import Counter

                    _throttled = Counter(
                        "celery_bulkhead_tenant_throttled",
                        "Tasks whose tenant was over its limit (refused, dropped or deferred).",
                        ["pool", "side"],
                    )
            child = _throttled_children[(pool, side)] = _throttled.labels(pool=pool, side=side)
        child.inc()
    except Exception:  # a metric must never break a publish
        logger.exception("celery-bulkhead: could not count a throttle")


class DropLog:
    """At most one warning per pool per ``interval`` seconds, with the count in between."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._state: dict[str, tuple[float, int]] = {}

    def dropped(self, pool: str, depth: int, cap: int) -> None:
        now = time.monotonic()
        with self._lock:
            last, pending = self._state.get(pool, (-self.interval, 0))
            pending += 1
            if now - last < self.interval:
                self._state[pool] = (last, pending)
                return
            self._state[pool] = (now, 0)
        logger.warning(
            "celery-bulkhead: pool %r is full (%d ready, cap %d): dropped %d task(s) "
            "since the last report",
            pool,
            depth,
            cap,
            pending,
        )
