"""Exact queue caps on the Redis transport: check and push in one Lua call.

kombu's Redis channel delivers a message with a plain ``LPUSH`` in
``Channel._put`` and offers no hook in between, so this module wraps that
method once per process.  The wrapper does nothing unless a capped publish
is in progress on the current thread or task
(:data:`celery_bulkhead.capped_push.CURRENT`, set by
:mod:`celery_bulkhead.admission`) *and* the message is being delivered to
that publish's queue; then it runs ``lua/capped_push.lua``, which sums the
queue's priority sub-lists (kombu's ``<queue><sep><step>`` keys, with the
``global_keyprefix``) and pushes only while the total is below the cap.  The
check rides in the same round trip as the push.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from kombu.utils.json import dumps
from redis.exceptions import NoScriptError

from .capped_push import CappedPush, QueueFull, hook_put

__all__ = ["install"]

_TEMPLATE = resources.files(__package__).joinpath("lua/capped_push.lua").read_text()


def _lua_string(value: str) -> str:
    return '"' + "".join(f"\\{byte}" for byte in value.encode()) + '"'


@functools.lru_cache(maxsize=16)
def _script(suffixes: tuple[str, ...]) -> tuple[str, str]:
    """The script text for one set of priority suffixes, and its SHA1."""
    text = _TEMPLATE.replace("{{SUFFIXES}}", "{" + ", ".join(map(_lua_string, suffixes)) + "}")
    return text, hashlib.sha1(text.encode()).hexdigest()


@dataclass(frozen=True)
class _Layout:
    """How one kombu channel stores one queue: the script to run and its keys."""

    base: str | bytes  # KEYS[1], as passed to EVALSHA
    suffix_of: dict[int, bytes]  # priority step -> ARGV[2], the sub-list suffix
    text: str
    sha: bytes


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
        text, sha = _script(suffixes)
        encoded = {step: suffix.encode() for step, suffix in suffix_of.items()}
        layout = layouts[queue] = _Layout(base, encoded, text, sha.encode())
    return layout


def _capped_put(
    channel: Any, original: Any, queue: str, message: Any, push: CappedPush, **kwargs: Any
) -> None:
    # A producer-side publish batch (kwargs["_publish_batch"]) would defer the
    # push past the check: the capped push is always sent at once.
    priority = channel.priority(channel._get_message_priority(message, reverse=False))
    with channel.conn_or_acquire() as client:
        layout = _layout(channel, client, queue)
        args = (layout.base, push.cap_arg, layout.suffix_of[priority], dumps(message))
        try:
            result = int(client.execute_command("EVALSHA", layout.sha, b"1", *args))
        except NoScriptError:
            client.script_load(layout.text)
            result = int(client.execute_command("EVALSHA", layout.sha, b"1", *args))
    if result < 0:
        raise QueueFull(-result)


def install() -> None:
    """Wrap kombu's Redis ``Channel._put`` once per process (idempotent)."""
    from kombu.transport import redis as kombu_redis

    hook_put(kombu_redis.Channel, _capped_put)
