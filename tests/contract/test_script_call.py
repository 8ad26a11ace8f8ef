"""The hot path's script call (:func:`celery_bulkhead.scripts.call`), on a real Redis.

A capped or tenant-limited publish and a tenant's bucket run their script
over a connection's socket, outside redis-py's command layers.  What a
redis-py client gives for free is asked of it here: a connection the server
closed while idle is replaced before the call (never sent twice), a flushed
script is registered again, an error reply raises and keeps the connection,
and a reply no script of ours gives drops the connection.  (A frozen or
stopped server: ``tests/e2e/test_faults.py`` and the tenant outage tests.)
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.exceptions import (
    BusyLoadingError,
    ConnectionError,
    InvalidResponse,
    ReadOnlyError,
    ResponseError,
)

from celery_bulkhead import scripts
from tests.support import BROKERS


def script(name: str, text: str) -> scripts.Script:
    return scripts.Script(name, text, hashlib.sha1(text.encode()).hexdigest().encode())


#: Counts its calls: a call sent twice would show.
COUNTER = script("counter", "return redis.call('INCR', KEYS[1])")


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(BROKERS["redis"])
    yield client
    client.close()


@pytest.fixture
def key(client: redis.Redis) -> Iterator[bytes]:
    name = f"contract-call-{uuid.uuid4().hex[:8]}".encode()
    yield name
    client.delete(name)


def connection(client: redis.Redis, name: str | None = None) -> Any:
    """A connection as the hot path makes one, named so the server's client list shows it."""
    return scripts.connection(redis.ConnectionPool.from_url(BROKERS["redis"], client_name=name))


def client_ids(client: redis.Redis, name: str) -> list[int]:
    return [int(c["id"]) for c in client.client_list() if c.get("name") == name]


def test_a_connection_closed_by_the_server_while_idle_is_replaced_and_sent_once(
    client: redis.Redis, key: bytes
) -> None:
    name = f"call-{uuid.uuid4().hex[:8]}"
    conn = connection(client, name)
    assert scripts.call(conn, COUNTER, (b"1", key)) == 1
    (first,) = client_ids(client, name)
    client.client_kill_filter(_id=first)  # as a restart or an idle timeout would
    assert scripts.call(conn, COUNTER, (b"1", key)) == 2  # no error: a new connection
    assert client_ids(client, name) not in ([], [first])
    assert int(client.get(key) or 0) == 2  # and the script ran once per call
    conn.disconnect()


def test_a_flushed_script_is_registered_again_transparently(
    client: redis.Redis, key: bytes
) -> None:
    conn = connection(client)
    packed = scripts.pack(b"EVALSHA", COUNTER.sha, b"1", key)
    assert scripts.call(conn, COUNTER, (b"1", key), packed) == 1
    client.script_flush()
    assert scripts.call(conn, COUNTER, (b"1", key), packed) == 2  # NOSCRIPT: sent whole
    assert client.script_exists(COUNTER.sha.decode()) == [True]
    assert scripts.call(conn, COUNTER, (b"1", key), packed) == 3
    conn.disconnect()


def test_a_status_reply_is_bytes_and_an_error_reply_raises_and_keeps_the_connection(
    client: redis.Redis, key: bytes
) -> None:
    name = f"call-{uuid.uuid4().hex[:8]}"
    conn = connection(client, name)
    status = script("status", "return redis.status_reply('1234')")
    assert scripts.call(conn, status, (b"0",)) == b"1234"
    (held,) = client_ids(client, name)
    failing = script("failing", "return redis.error_reply('BAD no such thing')")
    with pytest.raises(ResponseError, match="BAD no such thing"):
        scripts.call(conn, failing, (b"0",))
    assert scripts.call(conn, COUNTER, (b"1", key)) == 1
    assert client_ids(client, name) == [held]  # the same connection throughout
    conn.disconnect()


def test_a_reply_of_more_than_one_line_drops_the_connection(client: redis.Redis) -> None:
    conn = connection(client)
    listing = script("listing", "return {1, 2}")
    with pytest.raises(InvalidResponse):
        scripts.call(conn, listing, (b"0",))
    assert conn._sock is None  # nothing half-read is left for the next call


def test_redis_py_error_types_survive_and_a_replica_drops_the_connection(
    client: redis.Redis, key: bytes
) -> None:
    """LOADING stays a BusyLoadingError (a ConnectionError: retried within the deadline);
    READONLY (a failover made the server a replica) drops the connection."""
    name = f"call-{uuid.uuid4().hex[:8]}"
    conn = connection(client, name)
    loading = script("loading", "return redis.error_reply('LOADING Redis is loading')")
    with pytest.raises(BusyLoadingError):
        scripts.call(conn, loading, (b"0",))
    assert conn._sock is not None  # an answer: the connection is fine
    replica = script("replica", "return redis.error_reply('READONLY a read only replica')")
    with pytest.raises(ConnectionError) as dropped:
        scripts.call(conn, replica, (b"0",))
    assert isinstance(dropped.value.__cause__, ReadOnlyError)
    assert not client_ids(client, name) or conn._sock is None
    assert scripts.call(conn, COUNTER, (b"1", key)) == 1  # a new connection


def test_a_call_connection_speaks_resp2(client: redis.Redis, key: bytes) -> None:
    """redis-py 8 defaults to RESP3, where push frames (maintenance notifications) may
    arrive beside a reply; the one-line reader needs RESP2."""
    name = f"call-{uuid.uuid4().hex[:8]}"
    conn = connection(client, name)
    scripts.call(conn, COUNTER, (b"1", key))
    (entry,) = [c for c in client.client_list() if c.get("name") == name]
    assert entry["resp"] == "2"
    conn.disconnect()
