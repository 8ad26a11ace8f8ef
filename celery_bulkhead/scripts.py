"""Lua scripts: package data in ``lua/``, run with ``EVALSHA``, reloaded on ``NOSCRIPT``.

Each script documents its KEYS/ARGV contract in its header.  :func:`load`
reads one once per process (with optional ``{{NAME}}`` substitutions, for
values fixed for a client's lifetime) and :func:`run` calls it: ``EVALSHA``
first, and after a Redis restart or ``SCRIPT FLUSH`` (``NOSCRIPT``) the
script is registered again and the call repeated, transparently.

The hot path (a capped or tenant-limited publish, a tenant's bucket) uses
:func:`call` instead: one script over one redis-py connection's socket,
outside redis-py's command layers (pool checkout, retries, events,
observability), which cost a publish more than Redis takes to run the
script.  It takes replies of one line only (an integer, a status or an
error), which is all these scripts answer.

Redis-only: this module imports redis-py, so only Redis backends import it.
"""

from __future__ import annotations

import functools
import hashlib
import select
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["Script", "call", "connection", "fragment", "load", "pack", "run"]


@dataclass(frozen=True)
class Script:
    """A Lua script's text and SHA1 (as bytes, ready for ``EVALSHA``)."""

    name: str
    text: str
    sha: bytes


@functools.lru_cache(maxsize=64)
def _template(name: str) -> str:
    return resources.files(__package__).joinpath(f"lua/{name}.lua").read_text()


def fragment(name: str) -> str:
    """The text of ``lua/<name>.lua``, to paste into scripts as a substitution."""
    return _template(name)


@functools.lru_cache(maxsize=64)
def load(name: str, substitutions: tuple[tuple[str, str], ...] = ()) -> Script:
    """The script ``lua/<name>.lua`` with each ``{{KEY}}`` replaced by its value."""
    text = _template(name)
    for key, value in substitutions:
        text = text.replace("{{" + key + "}}", value)
    return Script(name, text, hashlib.sha1(text.encode()).hexdigest().encode())


def run(client: Any, script: Script, numkeys: bytes, *args: Any) -> Any:
    """``EVALSHA`` ``script`` on ``client``; on ``NOSCRIPT`` load it and call again."""
    try:
        return client.execute_command("EVALSHA", script.sha, numkeys, *args)
    except NoScriptError:
        client.script_load(script.text)
        return client.execute_command("EVALSHA", script.sha, numkeys, *args)


def connection(pool: Any) -> Any:
    """A connection for :func:`call`, made from ``pool``'s settings (URL, TLS, auth, timeouts).

    It speaks RESP2 and has no maintenance notifications (redis-py 8 defaults
    to RESP3 with them on where the server offers them): a push frame
    arriving beside a reply would not be one line, and :func:`call` reads
    one line.
    """
    kwargs = dict(pool.connection_kwargs)
    kwargs["protocol"] = 2
    if "maint_notifications_config" in kwargs:  # redis-py 8
        kwargs["maint_notifications_config"] = None
    kwargs.pop("maint_notifications_pool_handler", None)
    kwargs.pop("oss_cluster_maint_notifications_handler", None)
    return pool.connection_class(**kwargs)


def pack(*args: bytes) -> bytes:
    """A command in Redis's wire protocol (RESP), every argument already bytes."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


def call(conn: Any, script: Script, args: tuple[bytes, ...], packed: bytes | None = None) -> Any:
    """Run ``script`` with ``args`` (numkeys, keys, argv) over ``conn``'s socket.

    ``packed`` is ``EVALSHA sha *args`` already packed (:func:`pack`), for a
    caller that sends the same command often.  On ``NOSCRIPT`` (a restarted or
    flushed Redis) the script is sent whole with ``EVAL``, which also
    registers it.  Answers an ``int`` (an integer reply) or ``bytes`` (a
    status reply); an error reply raises redis-py's exception for it (a
    :class:`~redis.exceptions.ResponseError`, ``BusyLoadingError`` while
    Redis loads its data; ``READONLY`` drops the connection and raises a
    ``ConnectionError``), and a connection that fails or times out is dropped (the next call
    connects anew) and raises redis-py's ``ConnectionError`` or
    ``TimeoutError``, as a redis-py client would.
    """
    try:
        return _round_trip(conn, packed or pack(b"EVALSHA", script.sha, *args))
    except NoScriptError:
        return _round_trip(conn, pack(b"EVAL", script.text.encode(), *args))


def _round_trip(conn: Any, command: bytes) -> Any:
    sock = _socket(conn)
    try:
        sock.sendall(command)
        line = sock.recv(_CHUNK)
        while line[-2:] != b"\r\n":
            if not line:
                raise RedisConnectionError("Connection closed by server.")
            more = sock.recv(_CHUNK)
            if not more:
                raise RedisConnectionError("Connection closed by server.")
            line += more
    except TimeoutError as exc:  # socket.timeout
        conn.disconnect()
        raise RedisTimeoutError(f"Timeout talking to Redis: {exc}") from exc
    except OSError as exc:
        conn.disconnect()
        raise RedisConnectionError(f"Error talking to Redis: {exc}") from exc
    except BaseException:
        conn.disconnect()  # interrupted mid-reply: the connection's state is unknown
        raise
    kind, body = line[:1], line[1:-2]
    if b"\r\n" in body:
        kind = b""  # more than one line: not a reply these scripts give
    if kind == b":":
        return int(body)
    if kind == b"+":
        return body
    if kind == b"-":
        # redis-py's own error types: LOADING is a BusyLoadingError (a
        # ConnectionError, retried within the deadline), NOSCRIPT a NoScriptError.
        error = conn._parser.parse_error(body.decode("utf-8", "replace"))
        if isinstance(error, ReadOnlyError):
            # The server became a replica (a failover): drop the connection,
            # so the next one finds the master (Sentinel) or fails as a
            # connection error, as redis-py's Sentinel connections do.
            conn.disconnect()
            raise RedisConnectionError("The server is a read-only replica now") from error
        raise error
    conn.disconnect()
    raise InvalidResponse(f"Unexpected reply to a script call: {line[:40]!r}")


#: Bytes asked of the socket at once: a one-line reply fits many times over.
_CHUNK = 4096


def _socket(conn: Any) -> Any:
    """``conn``'s socket, connected; first dropped if it went stale.

    As redis-py's pool checks a connection on checkout: an idle connection
    that reads as ready was closed by the server (a restart, an idle
    timeout) or holds data nobody asked for; it is closed, and made anew.
    """
    sock = conn._sock
    if sock is not None and _readable(sock):
        conn.disconnect()
        sock = None
    if sock is None:
        conn.connect()
        sock = conn._sock
    return sock


def _readable(sock: Any) -> bool:
    if _poll is None:  # no poll(2) (Windows): select(2)
        return bool(select.select([sock], [], [], 0)[0])
    poller = _poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


_poll = getattr(select, "poll", None)
