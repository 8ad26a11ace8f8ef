"""The capped-push contract, on every transport whose ``_put`` admission hooks.

The same behaviour is asked of the in-memory hook (a lock) and the Redis
hook (one Lua call): below the cap a message is pushed, at the cap nothing
is pushed and :class:`QueueFull` carries the depth, every priority sub-list
counts, and concurrent producers never push past the cap.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from kombu import Connection, Exchange, Queue

from celery_bulkhead import caps
from celery_bulkhead.caps import CURRENT, CappedPush, QueueFull
from tests.support import BROKERS, wait_for

TRANSPORTS = {"memory": "memory://", "redis": BROKERS["redis"]}


@pytest.fixture(params=sorted(TRANSPORTS))
def connection(request: pytest.FixtureRequest) -> Iterator[Connection]:
    caps.install(request.param)
    with Connection(
        TRANSPORTS[request.param], transport_options={"priority_steps": [0, 3, 6, 9]}
    ) as conn:
        conn.ensure_connection(max_retries=1)  # a missing broker fails here
        yield conn


@pytest.fixture
def queue(connection: Connection) -> Iterator[Queue]:
    name = f"contract-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with connection.channel() as channel:
        queue(channel).declare()
    yield queue
    with connection.channel() as channel:
        queue(channel).delete()


def publish(
    connection: Connection,
    queue: Queue,
    cap: int,
    priority: int = 0,
    push: CappedPush | None = None,
) -> None:
    token = CURRENT.set(push or CappedPush(queue.name, cap))
    try:
        with connection.Producer() as producer:
            producer.publish(
                {"n": 1}, exchange=queue.exchange, routing_key=queue.routing_key, priority=priority
            )
    finally:
        CURRENT.reset(token)


def depth(connection: Connection, queue: Queue) -> int:
    with connection.channel() as channel:
        return int(channel._size(queue.name))


def test_below_the_cap_pushes_and_at_the_cap_refuses_with_the_depth(
    connection: Connection, queue: Queue
) -> None:
    publish(connection, queue, cap=2)
    publish(connection, queue, cap=2)
    with pytest.raises(QueueFull) as full:
        publish(connection, queue, cap=2)
    assert full.value.depth == 2
    assert depth(connection, queue) == 2


def test_every_priority_counts_toward_the_cap(connection: Connection, queue: Queue) -> None:
    for priority in (0, 3, 9):
        publish(connection, queue, cap=3, priority=priority)
    with pytest.raises(QueueFull) as full:
        publish(connection, queue, cap=3, priority=6)
    assert full.value.depth == 3


def test_a_publish_to_another_queue_is_not_capped(connection: Connection, queue: Queue) -> None:
    token = CURRENT.set(CappedPush("some-other-queue", 0 + 1))
    try:
        with connection.Producer() as producer:
            for _ in range(3):
                producer.publish({}, exchange=queue.exchange, routing_key=queue.routing_key)
    finally:
        CURRENT.reset(token)
    assert depth(connection, queue) == 3


def test_concurrent_producers_never_push_past_the_cap(connection: Connection, queue: Queue) -> None:
    admitted: list[int] = []
    barrier = threading.Barrier(8)

    def produce() -> None:
        with Connection(connection.as_uri(include_password=True)) as own:
            own.transport_options.update(connection.transport_options)
            barrier.wait(timeout=30)
            for i in range(25):
                try:
                    publish(own, queue, cap=50)
                    admitted.append(i)
                except QueueFull:
                    pass

    threads = [threading.Thread(target=produce) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(admitted) == 50  # of 200 attempts
    assert depth(connection, queue) == 50


def test_a_capped_push_refreshes_the_queues_expiry_like_kombu() -> None:
    """Redis: kombu's ``_put`` PEXPIREs a queue declared with x-expires; so does the capped push."""
    import redis

    caps.install("redis")
    name = f"contract-exp-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name, expires=120)
    client = redis.Redis.from_url(BROKERS["redis"])
    with Connection(BROKERS["redis"]) as conn:
        # kombu remembers a queue's x-expires on the channel that declared it:
        # the producer's own channel, as when Celery declares before publishing.
        queue(conn.default_channel).declare()
        try:
            publish(conn, queue, cap=5)
            ttl = client.pttl(name)
            assert 0 < ttl <= 120_000
        finally:
            with conn.channel() as channel:
                queue(channel).delete()
            client.delete(name)


def _tenant_push(queue: Queue, cap: int, key: str, rate: int, burst: int) -> CappedPush:
    interval = str(1_000_000 // rate).encode()
    return CappedPush(queue.name, cap, (key, interval, str(burst).encode()))


@pytest.mark.parametrize("priority", [0, 6])
def test_the_one_call_tenant_push_counts_every_priority_and_spends_no_token_when_full(
    priority: int,
) -> None:
    """Redis: bucket, cap and push in one call (``lua/tenant_push.lua``).

    A full queue refuses before the tenant's bucket is touched; a spent
    bucket refuses with the wait until its next token, and pushes nothing.
    """
    import redis

    caps.install("redis")
    name = f"contract-tenant-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    key = f"bulkhead:{{contract:{name}}}:rate"
    client = redis.Redis.from_url(BROKERS["redis"])
    with Connection(BROKERS["redis"], transport_options={"priority_steps": [0, 3, 6, 9]}) as conn:
        queue(conn.default_channel).declare()
        try:
            # Two messages of other priorities first: the cap counts them.
            publish(conn, queue, cap=10, priority=3)
            publish(conn, queue, cap=10, priority=9)
            push = _tenant_push(queue, cap=3, key=key, rate=1, burst=5)
            publish(conn, queue, 0, priority, push=push)  # depth 3: one token spent
            tat_after_one = int(client.get(key) or 0)
            assert tat_after_one > 0
            with pytest.raises(QueueFull) as full:
                publish(conn, queue, 0, priority, push=push)
            assert full.value.depth == 3
            assert depth(conn, queue) == 3
            assert int(client.get(key) or 0) == tat_after_one  # the refused push spent nothing
            roomy = _tenant_push(queue, cap=100, key=key, rate=1, burst=5)
            for _ in range(4):  # the 4 tokens left of the burst of 5
                publish(conn, queue, 0, priority, push=roomy)
            with pytest.raises(caps.TenantRefused) as limited:
                publish(conn, queue, 0, priority, push=roomy)
            assert 0 < limited.value.wait <= 1.0  # the next token of 1/s
            assert depth(conn, queue) == 7
            assert 0 < client.pttl(key) <= 5_000  # no longer than a full refill
        finally:
            with conn.channel() as channel:
                queue(channel).delete()
            client.delete(key)


def test_a_capped_push_survives_a_dropped_connection_and_closes_with_its_connection() -> None:
    """Redis: the push's own connection is remade after the server drops it, never
    pushing twice, and is closed when the producer's connection closes (no leak)."""
    import redis

    caps.install("redis")
    name = f"contract-conn-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    client = redis.Redis.from_url(BROKERS["redis"])

    def ours() -> list[int]:
        return [int(c["id"]) for c in client.client_list() if c.get("name") == name]

    try:
        with Connection(BROKERS["redis"], transport_options={"client_name": name}) as conn:
            queue(conn.default_channel).declare()
            publish(conn, queue, cap=5)
            assert ours()
            for held in ours():
                client.client_kill_filter(_id=held)  # a restart, an idle timeout
            publish(conn, queue, cap=5)  # no error, no retry: a new connection
            assert depth(conn, queue) == 2
            queue(conn.default_channel).delete()
        wait_for(lambda: not ours(), 5, "the connections to close with the producer's")
    finally:
        client.delete(name)


def test_the_push_connection_is_remade_after_its_pool_forgets_it() -> None:
    """Redis: redis-py resets a pool after a fork it was not told of (gunicorn
    --preload, a bare os.fork), forgetting its connections.  The push's
    connection is then made anew among the pool's connections in use, the
    set that ``within()`` gives the deadline and the channel's close
    disconnects; the forgotten one is closed."""
    caps.install("redis")
    name = f"contract-reset-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with Connection(BROKERS["redis"]) as conn:
        channel = conn.default_channel
        queue(channel).declare()
        try:
            publish(conn, queue, cap=5)
            pool = channel.pool
            (first,) = [c for c in pool._in_use_connections if c._sock is not None]
            pool.reset()  # as _checkpid() does in a forked child
            publish(conn, queue, cap=5)
            assert depth(conn, queue) == 2
            (second,) = [c for c in pool._in_use_connections if c._sock is not None]
            assert second is not first and first._sock is None
            with caps.within("redis", conn, time.monotonic() + 0.5):
                assert second._sock.gettimeout() <= 0.5  # the deadline reaches it
        finally:
            queue(channel).delete()
