"""Exact queue caps on kombu's in-memory transport (``memory://``), for tests.

The in-memory transport keeps its queues in the process, so every producer
of a queue runs in this process: checking the depth and putting the message
under one process-wide lock makes the cap exact, as on Redis and RabbitMQ.
This lets an app's own test suite exercise ``reject``, ``drop`` and
``block`` with ``broker_url="memory://"`` and a worker in the same process.
"""

from __future__ import annotations

import threading
from typing import Any

from .capped_push import CURRENT, QueueFull

__all__ = ["install"]

_lock = threading.Lock()


def install() -> None:
    """Wrap kombu's in-memory ``Channel._put`` once per process (idempotent)."""
    from kombu.transport import memory

    original = memory.Channel._put
    if getattr(original, "_celery_bulkhead", False):
        return

    def _put(self: Any, queue: str, message: Any, **kwargs: Any) -> Any:
        push = CURRENT.get()
        if push is None or push.queue != queue:
            return original(self, queue, message, **kwargs)
        with _lock:
            depth = int(self._size(queue))
            if depth >= push.cap:
                raise QueueFull(depth)
            return original(self, queue, message, **kwargs)

    _put._celery_bulkhead = True  # type: ignore[attr-defined]
    _put.__wrapped__ = original  # type: ignore[attr-defined]
    memory.Channel._put = _put  # type: ignore[method-assign]
