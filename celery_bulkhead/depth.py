"""Ready messages in a queue, as the broker counts them.

One answer for ``celery bulkhead status`` and the worker's
``celery_bulkhead_queue_depth``: on RabbitMQ the message count of a passive
``queue.declare``; on Redis the sum of kombu's priority sub-lists with the
transport's ``global_keyprefix`` applied (kombu's passive declare checks
the unprefixed keys, so with a key prefix it reports a queue as missing).
"""

from __future__ import annotations

from typing import Any

__all__ = ["queue_depth"]


def queue_depth(connection: Any, queue: str) -> int:
    """Ready messages in ``queue`` on ``connection`` (a kombu Connection); 0 when it is absent."""
    with connection.channel() as channel:
        if connection.transport.driver_type == "redis":
            return int(channel._size(queue))
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except connection.channel_errors:
            return 0  # never declared: nothing is waiting
