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

import functools
import hashlib
from contextvars import ContextVar
from dataclasses import dataclass
from importlib import resources
from typing import Any

from kombu.utils.json import dumps
from redis.exceptions import NoScriptError

__all__ = ["CappedPush", "QueueFull", "install", "queue_depth"]

_TEMPLATE = resources.files(__package__).joinpath("lua/capped_push.lua").read_text()


def _lua_string(value: str) -> str:
    return '"' + "".join(f"\\{byte}" for byte in value.encode()) + '"'


@functools.lru_cache(maxsize=16)
def _script(suffixes: tuple[str, ...]) -> tuple[str, str]:
    """The script text for one set of priority suffixes, and its SHA1."""
    text = _TEMPLATE.replace("{{SUFFIXES}}", "{" + ", ".join(map(_lua_string, suffixes)) + "}")
    return text, hashlib.sha1(text.encode()).hexdigest()


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


@functools.lru_cache(maxsize=1024)
def _layout(
    queue: str, sep: str, steps: tuple[int, ...], prefix: str, prefixed_client: bool
) -> tuple[str, dict[int, str], tuple[str, ...]]:
    """Base key (as passed to EVALSHA), suffix per priority step, and all suffixes."""
    suffix_of = {step: (f"{sep}{step}" if step else "") for step in steps}
    suffixes = tuple(dict.fromkeys(s for s in suffix_of.values() if s))
    # kombu's prefixed client adds the prefix to the first key of an EVALSHA
    # itself (PrefixedStrictRedis.PREFIXED_COMPLEX_COMMANDS).
    base = queue if (prefixed_client or not prefix) else prefix + queue
    return base, suffix_of, suffixes


def _capped_put(channel: Any, queue: str, message: Any, push: CappedPush) -> None:
    priority = channel.priority(channel._get_message_priority(message, reverse=False))
    with channel.conn_or_acquire() as client:
        base, suffix_of, suffixes = _layout(
            queue,
            channel.sep,
            tuple(channel.priority_steps),
            getattr(channel, "global_keyprefix", "") or "",
            bool(getattr(client, "global_keyprefix", None)),
        )
        text, sha = _script(suffixes)
        args = (sha, 1, base, push.cap, suffix_of[priority], dumps(message))
        try:
            result = int(client.evalsha(*args))
        except NoScriptError:
            client.script_load(text)
            result = int(client.evalsha(*args))
    if result < 0:
        push.depth = -result
        raise QueueFull(-result)
    push.depth = result


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
