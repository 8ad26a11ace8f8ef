"""The capped publish in progress, as the transport hooks see it.

kombu calls a virtual transport's ``Channel._put`` deep inside
``Producer.publish``, with no way to pass anything along.  Admission sets
:data:`CURRENT` around a capped publish; the transport hook
(:mod:`~celery_bulkhead.redis_cap`, :mod:`~celery_bulkhead.memory_cap`)
reads it and, for a message bound to that publish's queue, pushes only
below the cap or raises :class:`QueueFull`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CURRENT", "CappedPush", "QueueFull", "hook_put"]


class QueueFull(Exception):
    """Internal: the capped push found the queue full (``depth`` ready messages)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        super().__init__(depth)


@dataclass(frozen=True)
class CappedPush:
    """A capped publish in progress: its queue and its cap (one per pool, reused)."""

    queue: str
    cap: int
    cap_arg: bytes = field(init=False, repr=False)  # Redis ARGV[1], encoded once

    def __post_init__(self) -> None:
        object.__setattr__(self, "cap_arg", str(self.cap).encode())


#: The capped publish running on this thread or task, if any.
CURRENT: ContextVar[CappedPush | None] = ContextVar("celery_bulkhead_capped_push", default=None)


#: ``capped_put(channel, original_put, queue, message, push, **kwargs)``: push
#: below ``push.cap`` or raise :class:`QueueFull`.
CappedPut = Callable[..., Any]


def hook_put(channel_class: Any, capped_put: CappedPut) -> None:
    """Wrap a virtual transport's ``Channel._put`` once per process (idempotent).

    The wrapper does nothing unless a capped publish is in progress
    (:data:`CURRENT`) and the message goes to that publish's queue; then it
    hands the message to ``capped_put``.
    """
    original = channel_class._put
    if getattr(original, "_celery_bulkhead", False):
        return

    def _put(self: Any, queue: str, message: Any, **kwargs: Any) -> Any:
        push = CURRENT.get()
        if push is None or push.queue != queue:
            return original(self, queue, message, **kwargs)
        return capped_put(self, original, queue, message, push, **kwargs)

    _put._celery_bulkhead = True  # type: ignore[attr-defined]
    _put.__wrapped__ = original  # type: ignore[attr-defined]
    channel_class._put = _put
