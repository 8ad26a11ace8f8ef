"""Broker-specific admission: Redis priorities and key prefix, RabbitMQ queue arguments."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Queue

from celery_bulkhead import ConfigurationError, PoolFull
from tests.app.capped import make_capped_app
from tests.support import BROKERS


@pytest.fixture
def prefix() -> Iterator[str]:
    value = f"bhb{uuid.uuid4().hex[:8]}"
    yield value
    client = redis.Redis.from_url(BROKERS["redis"])
    keys = list(client.scan_iter(match=f"*{value}*"))
    if keys:
        client.delete(*keys)


def test_redis_cap_counts_priority_sub_queues_and_the_key_prefix(prefix: str) -> None:
    """Depth is every priority sub-list under the global key prefix, not a bare LLEN."""
    app = make_capped_app(
        BROKERS["redis"],
        prefix,
        broker_transport_options={"global_keyprefix": f"{prefix}:", "priority_steps": [0, 3, 6, 9]},
    )
    task = app.tasks["capped.small.noop"]
    task.apply_async(args=[1], priority=9)
    task.apply_async(args=[2], priority=0)
    with pytest.raises(PoolFull) as info:
        task.apply_async(args=[3], priority=5)
    assert info.value.depth == 2
    client = redis.Redis.from_url(BROKERS["redis"])
    queue = f"{prefix}.small"
    lengths = {
        key.decode(): client.llen(key) for key in client.scan_iter(match=f"{prefix}:{queue}*")
    }
    assert sum(lengths.values()) == 2
    assert len(lengths) == 2  # one message in the base list, one in a priority sub-list
    assert lengths[f"{prefix}:{queue}"] == 1


def test_redis_cap_with_priorities_under_load(prefix: str) -> None:
    app = make_capped_app(BROKERS["redis"], prefix)
    task = app.tasks["capped.noop"]
    admitted = 0
    for i in range(150):
        try:
            task.apply_async(args=[i], priority=(i % 10))
            admitted += 1
        except PoolFull:
            pass
    assert admitted == 100
    with Connection(BROKERS["redis"]) as conn, conn.channel() as channel:
        assert channel.queue_declare(queue=f"{prefix}.capped", passive=True).message_count == 100


def test_rabbitmq_queue_with_other_arguments_is_a_clear_error(prefix: str) -> None:
    url = BROKERS["rabbitmq"]
    queue = f"{prefix}.small"
    with Connection(url) as conn:
        Queue(queue, max_length=50)(conn.default_channel).declare()
    try:
        app = make_capped_app(url, prefix)
        with pytest.raises(ConfigurationError) as info:
            app.tasks["capped.small.noop"].delay(1)
        message = str(info.value)
        assert info.value.pool == "small" and info.value.setting == "max_queue"
        assert (
            f"queue {queue!r} already exists with x-max-length=50; "
            "this app declares x-max-length=2" in message
        )
    finally:
        with Connection(url) as conn:
            conn.default_channel.queue_delete(queue)


def test_rabbitmq_queue_that_exists_without_a_cap_is_a_clear_error(prefix: str) -> None:
    """The common migration: a pool ran uncapped, then max_queue is added."""
    url = BROKERS["rabbitmq"]
    queue = f"{prefix}.small"
    with Connection(url) as conn:
        Queue(queue)(conn.default_channel).declare()
    try:
        app = make_capped_app(url, prefix)
        with pytest.raises(ConfigurationError) as info:
            app.tasks["capped.small.noop"].delay(1)
        assert (info.value.pool, info.value.setting, info.value.value) == ("small", "max_queue", 2)
        assert (
            f"queue {queue!r} already exists with x-max-length=(not set); "
            "this app declares x-max-length=2" in str(info.value)
        )
    finally:
        with Connection(url) as conn:
            conn.default_channel.queue_delete(queue)


def test_a_cap_on_a_transport_that_cannot_enforce_it_is_refused_when_the_bulkhead_is_built(
    tmp_path: Path,
) -> None:
    """Never a cap silently ignored, nor one that fails only at the first publish."""
    folder = str(tmp_path)
    options = {"data_folder_in": folder, "data_folder_out": folder, "control_folder": folder}
    with pytest.raises(ConfigurationError) as info:
        make_capped_app("filesystem://", "no-caps", broker_transport_options=options)
    assert (info.value.pool, info.value.setting, info.value.value) == ("capped", "max_queue", 100)
    assert "the 'filesystem' transport cannot cap a queue exactly" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing was published, nothing written


def _memory_app(prefix: str) -> Any:
    return make_capped_app("memory://", prefix)


def test_in_memory_caps_are_exact_for_each_policy() -> None:
    """``memory://`` (an app's own tests): reject, drop and block behave as on a real broker."""
    app = _memory_app(f"mem{uuid.uuid4().hex[:6]}")
    small = app.tasks["capped.small.noop"]
    small.delay(1)
    small.delay(2)
    with pytest.raises(PoolFull) as info:
        small.delay(3)
    assert (info.value.pool, info.value.depth, info.value.cap) == ("small", 2, 2)
    drop_me = app.tasks["capped.drop_me"]
    assert [drop_me.delay(i).dropped for i in range(4)] == [False, False, False, True]
    block_me = app.tasks["capped.block_me"]
    block_me.delay(1)
    block_me.delay(2)
    with pytest.raises(PoolFull, match="no room within"):
        block_me.delay(3)


def test_in_memory_cap_holds_under_concurrent_threads() -> None:
    prefix = f"memt{uuid.uuid4().hex[:6]}"
    app = _memory_app(prefix)
    task = app.tasks["capped.noop"]
    admitted: list[int] = []
    barrier = threading.Barrier(8)

    def produce() -> None:
        barrier.wait(timeout=30)
        for i in range(40):
            try:
                task.delay(i)
                admitted.append(i)
            except PoolFull:
                pass

    threads = [threading.Thread(target=produce) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(admitted) == 100  # cap 100 of 320 attempts
    with app.connection_for_write() as conn:
        assert conn.default_channel._size(f"{prefix}.capped") == 100
