"""Exact queue caps on the Redis transport: check and push in one Lua call.

kombu's Redis channel delivers a message with a plain ``LPUSH`` in
``Channel._put`` and offers no hook in between, so this module wraps that
method once per process (:func:`celery_bulkhead.caps.hook_put`).  For a
capped publish it runs ``lua/capped_push.lua``, which sums the queue's
priority sub-lists (kombu's ``<queue><sep><step>`` keys, with the
``global_keyprefix``) and pushes only while the total is below the cap.  The
check rides in the same round trip as the push.  A queue declared with
``x-expires`` has its sub-lists' expiry refreshed in the same call, as
kombu's own ``_put`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kombu.utils.json import dumps

from .. import scripts
from . import CappedPush, QueueFull, hook_put

__all__ = ["install"]


def _lua_string(value: str) -> str:
    return '"' + "".join(f"\\{byte}" for byte in value.encode()) + '"'


@dataclass(frozen=True)
class _Layout:
    """How one kombu channel stores one queue: the script to run and its keys."""

    base: str | bytes  # KEYS[1], as passed to EVALSHA
    suffix_of: dict[int, bytes]  # priority step -> ARGV[2], the sub-list suffix
    script: scripts.Script


def _layout(channel: Any, client: Any, queue: str) -> _Layout:
    # Cached on the channel: its separator, priority steps and key prefix are
    # fixed for its lifetime, and a publish should not recompute them.
    layouts: dict[str, _Layout] | None = channel.__dict__.get("_celery_bulkhead_layouts")
    if layouts is None:
        layouts = channel.__dict__["_celery_bulkhead_layouts"] = {}
    layout = layouts.get(queue)
    if layout is None:
        sep, prefix = channel.sep, getattr(channel, "global_keyprefix", "") or ""
        suffix_of = {step: (f"{sep}{step}" if step else "") for step in channel.priority_steps}
        suffixes = tuple(dict.fromkeys(s for s in suffix_of.values() if s))
        # kombu's prefixed client adds the prefix to the first key of an EVALSHA
        # itself (PrefixedStrictRedis.PREFIXED_COMPLEX_COMMANDS).
        # Arguments are encoded once here, not by redis-py on every call; the
        # prefixed client needs the key as text (it prefixes it with str()).
        prefixed_client = bool(getattr(client, "global_keyprefix", None))
        base = queue if prefixed_client else (prefix + queue).encode()
        lua_list = "{" + ", ".join(map(_lua_string, suffixes)) + "}"
        script = scripts.load("capped_push", (("SUFFIXES", lua_list),))
        encoded = {step: suffix.encode() for step, suffix in suffix_of.items()}
        layout = layouts[queue] = _Layout(base, encoded, script)
    return layout


def _capped_put(
    channel: Any, original: Any, queue: str, message: Any, push: CappedPush, **kwargs: Any
) -> None:
    # A producer-side publish batch (kwargs["_publish_batch"]) would defer the
    # push past the check: the capped push is always sent at once.
    priority = channel.priority(channel._get_message_priority(message, reverse=False))
    expires = channel._expires.get(queue) if getattr(channel, "_expires", None) else None
    with channel.conn_or_acquire() as client:
        layout = _layout(channel, client, queue)
        args = [layout.base, push.cap_arg, layout.suffix_of[priority], dumps(message)]
        if expires:
            args.append(str(int(expires)).encode())
        result = int(scripts.run(client, layout.script, b"1", *args))
    if result < 0:
        raise QueueFull(-result)


def install() -> None:
    """Wrap kombu's Redis ``Channel._put`` once per process (idempotent)."""
    from kombu.transport import redis as kombu_redis

    hook_put(kombu_redis.Channel, _capped_put)
