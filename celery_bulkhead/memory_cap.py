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

from .capped_push import CappedPush, QueueFull, hook_put

__all__ = ["install"]

_lock = threading.Lock()


def _capped_put(
    channel: Any, original: Any, queue: str, message: Any, push: CappedPush, **kwargs: Any
) -> Any:
    with _lock:
        depth = int(channel._size(queue))
        if depth >= push.cap:
            raise QueueFull(depth)
        return original(channel, queue, message, **kwargs)


def install() -> None:
    """Wrap kombu's in-memory ``Channel._put`` once per process (idempotent)."""
    from kombu.transport import memory

    hook_put(memory.Channel, _capped_put)
