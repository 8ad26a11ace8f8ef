"""Broker-specific admission: Redis priorities and key prefix, broker faults, RabbitMQ arguments."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu import Connection, Queue

from celery_bulkhead import BrokerUnavailable, ConfigurationError, PoolFull
from tests.app.capped import make_capped_app
from tests.conftest import BROKERS, wait_for


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


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A redis-server of the test's own, on a free loopback port, to stop and freeze."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    wait_for(lambda: _pings(client), 10, "the private redis-server")
    yield server, url
    if server.poll() is None:
        os.kill(server.pid, signal.SIGCONT)
        server.kill()
    server.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _timed_failure(task: object) -> tuple[float, BrokerUnavailable]:
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as info:
        task.delay(1)  # type: ignore[attr-defined]
    return time.monotonic() - started, info.value


def test_frozen_redis_fails_the_publish_in_bounded_time(
    private_redis: tuple[subprocess.Popen[bytes], str],
) -> None:
    server, url = private_redis
    app = make_capped_app(url, "frozen", publish_timeout=1.0)
    task = app.tasks["capped.noop"]
    task.delay(0)  # connected and working
    os.kill(server.pid, signal.SIGSTOP)
    try:
        elapsed, error = _timed_failure(task)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert elapsed < 4.0  # publish_timeout 1 s: one socket timeout past the deadline at most
    assert error.pool == "capped" and error.timeout == 1.0
    assert "broker unavailable, publish gave up within 1s" in str(error)
    assert error.__cause__ is not None
    task.delay(2)  # thawed: publishing works again


def test_stopped_redis_fails_the_publish_in_bounded_time(
    private_redis: tuple[subprocess.Popen[bytes], str],
) -> None:
    server, url = private_redis
    app = make_capped_app(url, "stopped", publish_timeout=1.0)
    task = app.tasks["capped.noop"]
    task.delay(0)
    server.kill()
    server.wait(timeout=10)
    elapsed, error = _timed_failure(task)
    assert elapsed < 4.0
    assert "broker unavailable" in str(error)


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
