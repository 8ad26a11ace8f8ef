"""Exact queue caps on kombu's in-memory transport (``memory://``), for tests.

The in-memory transport keeps its queues in the process, so every producer
of a queue runs in this process: checking the depth and putting the message
under one process-wide lock makes the cap exact, as on Redis and RabbitMQ.
This lets an app's own test suite exercise ``reject``, ``drop`` and
``block`` with ``broker_url="memory://"`` and a worker in the same process.
"""

from __future__ import annotations

import threading
from queue import Queue
from typing import Any

from . import CappedPush, QueueFull, hook_put

__all__ = ["install"]

_lock = threading.RLock()  # held by the capped put while kombu creates the queue


def _capped_put(
    channel: Any, original: Any, queue: str, message: Any, push: CappedPush, **kwargs: Any
) -> Any:
    with _lock:
        depth = int(channel._size(queue))
        if depth >= push.cap:
            raise QueueFull(depth)
        return original(channel, queue, message, **kwargs)


def _queue_for(channel: Any, queue: str) -> Any:
    # kombu creates a queue with check-then-set: two threads declaring and
    # putting at once can each create one, and what went into the lost one
    # vanishes (and the cap counts the wrong queue).  Created under the lock.
    queues = channel.queues
    found = queues.get(queue)
    if found is None:
        with _lock:
            found = queues.get(queue)
            if found is None:
                found = queues[queue] = Queue()
    return found


def _new_queue(channel: Any, queue: str, **kwargs: Any) -> None:
    _queue_for(channel, queue)


def install() -> None:
    """Wrap kombu's in-memory ``Channel._put`` once per process (idempotent)."""
    from kombu.transport import memory

    with _lock:
        channel: Any = memory.Channel  # replaced methods: the stubs' types do not apply
        channel._queue_for = _queue_for
        channel._new_queue = _new_queue
        hook_put(memory.Channel, _capped_put)
