"""Exact queue caps on the Redis transport: check and push in one Lua call.

kombu's Redis channel delivers a message with a plain ``LPUSH`` in
``Channel._put`` and offers no hook in between, so this module wraps that
method once per process.  The wrapper does nothing unless a capped publish
is in progress on the current thread or task (a context variable set by
:mod:`celery_bulkhead.admission`) *and* the message is being delivered to
that publish's queue; then it runs ``lua/capped_push.lua``, which sums the
queue's priority sub-lists (kombu's ``<queue><sep><step>`` keys, with the
``global_keyprefix``) and pushes only while the total is below the cap.  The
check rides in the same round trip as the push.
"""

from __future__ import annotations

import hashlib
from contextvars import ContextVar
from dataclasses import dataclass
from importlib import resources
from typing import Any

from kombu.utils.json import dumps

__all__ = ["CappedPush", "QueueFull", "install", "queue_depth"]

_SCRIPT = resources.files(__package__).joinpath("lua/capped_push.lua").read_text()
_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()


class QueueFull(Exception):
    """Internal: the capped push found the queue full (``depth`` ready messages)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        super().__init__(depth)


@dataclass
class CappedPush:
    """The capped publish in progress: its queue, its cap, and the depth it saw."""

    queue: str
    cap: int
    depth: int = 0


CURRENT: ContextVar[CappedPush | None] = ContextVar("celery_bulkhead_capped_push", default=None)


def _keys(channel: Any, queue: str) -> list[str]:
    keys: list[str] = []
    for step in channel.priority_steps:
        key = channel._q_for_pri(queue, step)
        if key not in keys:
            keys.append(key)
    return keys


def _script_keys(channel: Any, client: Any, keys: list[str]) -> list[str]:
    prefix = getattr(channel, "global_keyprefix", "") or ""
    if not prefix:
        return keys
    full = [prefix + key for key in keys]
    if getattr(client, "global_keyprefix", None):
        # kombu's prefixed client adds the prefix to the first key of an
        # EVALSHA itself (PrefixedStrictRedis.PREFIXED_COMPLEX_COMMANDS).
        full[0] = keys[0]
    return full


def _evalsha(client: Any, keys: list[str], args: list[Any]) -> Any:
    from redis.exceptions import NoScriptError

    try:
        return client.evalsha(_SHA, len(keys), *keys, *args)
    except NoScriptError:
        client.script_load(_SCRIPT)
        return client.evalsha(_SHA, len(keys), *keys, *args)


def _capped_put(channel: Any, queue: str, message: Any, push: CappedPush) -> None:
    priority = channel._get_message_priority(message, reverse=False)
    target = channel._q_for_pri(queue, priority)
    keys = _keys(channel, queue)
    with channel.conn_or_acquire() as client:
        pushed, depth = _evalsha(
            client,
            _script_keys(channel, client, keys),
            [push.cap, keys.index(target) + 1, dumps(message)],
        )
    push.depth = int(depth)
    if not int(pushed):
        raise QueueFull(int(depth))


def install() -> None:
    """Wrap kombu's Redis ``Channel._put`` once per process (idempotent)."""
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.Channel._put
    if getattr(original, "_celery_bulkhead", False):
        return

    def _put(self: Any, queue: str, message: Any, **kwargs: Any) -> Any:
        push = CURRENT.get()
        if push is None or push.queue != queue:
            return original(self, queue, message, **kwargs)
        # A producer-side publish batch would defer the push past the check.
        kwargs.pop("_publish_batch", None)
        return _capped_put(self, queue, message, push)

    _put._celery_bulkhead = True  # type: ignore[attr-defined]
    _put.__wrapped__ = original  # type: ignore[attr-defined]
    kombu_redis.Channel._put = _put  # type: ignore[method-assign]


def queue_depth(channel: Any, queue: str) -> int:
    """Ready messages in a kombu Redis queue: every priority sub-list, prefix applied."""
    return int(channel._size(queue))
