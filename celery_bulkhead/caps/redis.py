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

import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from kombu.utils.json import dumps

from .. import scripts
from . import CappedPush, QueueFull, TenantRefused, hook_put

__all__ = ["install", "within"]

_TIMEOUTS = ("socket_timeout", "socket_connect_timeout")


def _lua_string(value: str) -> str:
    return '"' + "".join(f"\\{byte}" for byte in value.encode()) + '"'


@dataclass(frozen=True)
class _Layout:
    """How one kombu channel stores one queue: the script to run and its keys."""

    base: bytes  # KEYS[1], the key prefix applied
    suffix_of: dict[int, bytes]  # priority step -> ARGV[2], the sub-list suffix
    script: scripts.Script
    tenant_script: scripts.Script  # the same push, spending a tenant's token too


def _layout(channel: Any, queue: str) -> _Layout:
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
        lua_list = "{" + ", ".join(map(_lua_string, suffixes)) + "}"
        # Both scripts count the queue's depth with the same fragment.
        depth = (("QUEUE_DEPTH", scripts.fragment("queue_depth")), ("SUFFIXES", lua_list))
        script = scripts.load("capped_push", depth)
        tenant_script = scripts.load("tenant_push", depth)
        encoded = {step: suffix.encode() for step, suffix in suffix_of.items()}
        # The key prefix applies to the queue's key only, as kombu's prefixed
        # client applies it to an EVALSHA's first key (a tenant's bucket key,
        # the second, is the same in every app sharing the state).
        layout = layouts[queue] = _Layout((prefix + queue).encode(), encoded, script, tenant_script)
    return layout


def _connection(channel: Any) -> Any:
    """The channel's own connection for capped pushes (:func:`scripts.call`).

    kombu makes a redis-py client for every ``_put``, and redis-py checks a
    connection out of its pool for every command, both costing a publish
    more than Redis takes to run the push.  A capped push goes over a
    connection of its own instead, made from the channel's pool settings
    (URL, TLS, auth, timeouts) and counted among the pool's connections in
    use: :func:`within` sets its timeouts with theirs, and the channel's close
    disconnects it with them.  A channel is used by one thread at a time.
    """
    held = channel.__dict__.get("_celery_bulkhead_conn")
    pool = channel.pool
    if (
        held is None
        or held[0] is not pool
        or held[1] != os.getpid()
        # A pool reset (redis-py resets a pool after a fork it was not told
        # of) forgets its connections: this one too, so it is made anew.
        or held[2] not in pool._in_use_connections
    ):
        if held is not None and held[1] == os.getpid():
            held[2].disconnect()  # this process's own: nothing else will close it now
        conn = scripts.connection(pool)
        pool._in_use_connections.add(conn)
        held = channel.__dict__["_celery_bulkhead_conn"] = (pool, os.getpid(), conn)
    return held[2]


def _capped_put(
    channel: Any, original: Any, queue: str, message: Any, push: CappedPush, **kwargs: Any
) -> None:
    # A producer-side publish batch (kwargs["_publish_batch"]) would defer the
    # push past the check: the capped push is always sent at once.
    priority = channel.priority(channel._get_message_priority(message, reverse=False))
    expires = channel._expires.get(queue) if getattr(channel, "_expires", None) else None
    conn = _connection(channel)
    layout = _layout(channel, queue)
    body = conn.encoder.encode(dumps(message))
    if push.bucket is not None:
        _tenant_put(conn, layout, push, priority, body, expires)
        return
    args: tuple[bytes, ...] = (b"1", layout.base, push.cap_arg, layout.suffix_of[priority], body)
    if expires:
        args += (str(int(expires)).encode(),)
    result = scripts.call(conn, layout.script, args)
    if result < 0:
        raise QueueFull(-result)


def _tenant_put(
    conn: Any, layout: _Layout, push: CappedPush, priority: int, body: bytes, expires: Any
) -> None:
    assert push.bucket is not None
    key, interval, burst = push.bucket
    args = (
        b"2",
        layout.base,
        key.encode(),
        push.cap_arg,
        layout.suffix_of[priority],
        body,
        str(int(expires or 0)).encode(),
        interval,
        burst,
    )
    result = scripts.call(conn, layout.tenant_script, args)
    if isinstance(result, bytes):  # a status reply: µs to the next token
        raise TenantRefused(int(result) / 1_000_000)
    if result < 0:
        raise QueueFull(-result)


#: How far past its deadline a socket operation may end before ``within`` bothers
#: to shrink the timeouts (a first attempt, just started: nothing to shrink).
SLACK = 0.05


def within(connection: Any, deadline: float) -> AbstractContextManager[Any]:
    """Every Redis socket operation of ``connection`` in the block ends by ``deadline``.

    kombu gives a connection's sockets fixed timeouts (the transport options
    ``socket_timeout`` and ``socket_connect_timeout``: ``publish_timeout``,
    set by the Bulkhead).  An attempt that starts late in a publish (a retry,
    a ``block`` attempt, a publish that waited for a producer) would wait
    that whole time again, past its deadline: in the (re)connect, which
    pings Redis from a new channel, and in the push.  In the block, the
    channels made and the connections used get the time left instead; the
    configured timeouts are put back after.  ``connection`` is a producer's
    that this thread holds: nothing else uses it meanwhile.

    The common case costs nothing: when the configured timeouts already end
    within :data:`SLACK` of ``deadline`` (a publish's first attempt), the
    timeouts are left alone.
    """
    configured = connection.transport_options
    left = max(deadline - time.monotonic(), 0.001)
    timeout = configured.get("socket_timeout")
    connect_timeout = configured.get("socket_connect_timeout")
    if (
        timeout is not None
        and connect_timeout is not None
        and timeout <= left + SLACK
        and connect_timeout <= left + SLACK
    ):
        return _UNCHANGED
    return _shrunk(connection, configured, left)


_UNCHANGED = nullcontext()


@contextmanager
def _shrunk(connection: Any, configured: dict[str, Any], left: float) -> Iterator[None]:
    # A new dict, not an update: the connections of a pool share the configured one.
    connection.transport_options = {**configured, **dict.fromkeys(_TIMEOUTS, left)}
    for channel in _channels(connection):
        _set_timeouts(channel, left, left)
    try:
        yield
    finally:
        connection.transport_options = configured
        for channel in _channels(connection):
            _set_timeouts(channel, *(configured.get(key) for key in _TIMEOUTS))


def _channels(connection: Any) -> list[Any]:
    transport = connection.__dict__.get("_transport")  # None: nothing made yet
    return list(getattr(transport, "channels", ()))


def _set_timeouts(channel: Any, timeout: float | None, connect_timeout: float | None) -> None:
    channel.socket_timeout = timeout  # for the channel's pools made from now on
    channel.socket_connect_timeout = connect_timeout
    for pool in (channel._pool, channel._async_pool):
        if pool is None:
            continue
        pool.connection_kwargs["socket_timeout"] = timeout  # its connections made from now on
        pool.connection_kwargs["socket_connect_timeout"] = connect_timeout
        for conn in (*pool._available_connections, *pool._in_use_connections):
            conn.socket_timeout = timeout  # applied to the socket at each (re)connect
            conn.socket_connect_timeout = connect_timeout
            sock = getattr(conn, "_sock", None)
            if sock is not None:
                sock.settimeout(timeout)


def install() -> None:
    """Wrap kombu's Redis ``Channel._put`` once per process (idempotent)."""
    from kombu.transport import redis as kombu_redis

    hook_put(kombu_redis.Channel, _capped_put)
