"""A broker that is down or frozen: every pool publish ends in bounded time, clearly.

``publish_timeout`` is 1 s here.  Each publish must raise ``BrokerUnavailable``
within a few seconds, not only the first one after the fault (later ones
reconnect, which kombu alone would retry for about 12 s), and publishing must
work again once the broker is back.  Redis faults use a private
``redis-server``; RabbitMQ faults a proxy in front of the shared broker
(:mod:`tests.proxy`), which can freeze without stopping it for other tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection

from celery_bulkhead import BrokerUnavailable
from tests.app.capped import make_capped_app
from tests.e2e.test_admission import admissions
from tests.proxy import FreezableProxy
from tests.support import BROKERS, wait_for

BOUND = 4.0  # publish_timeout (1 s) plus one connection attempt, with a generous margin
PUBLISHES = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_redis(port: int, tmp_path: Path) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            *("--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"),
            *("--dir", str(tmp_path)),
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    wait_for(lambda: _pings(client), 10, "the private redis-server")
    return server


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A redis-server of the test's own, on a free loopback port, to stop and freeze."""
    port = _free_port()
    server = _start_redis(port, tmp_path)
    yield server, port
    if server.poll() is None:
        os.kill(server.pid, signal.SIGCONT)
        server.kill()
    server.wait(timeout=10)


@pytest.fixture
def rabbitmq_proxy() -> Iterator[tuple[FreezableProxy, str]]:
    """A proxy to the shared RabbitMQ, and a queue prefix whose queues are deleted after."""
    proxy = FreezableProxy(("127.0.0.1", 5672))
    prefix = f"bho{uuid.uuid4().hex[:8]}"
    yield proxy, prefix
    proxy.stop()
    with Connection(BROKERS["rabbitmq"]) as conn:
        for suffix in ("capped", "capped.continue", "default"):
            with conn.channel() as channel, contextlib.suppress(conn.channel_errors):
                channel.queue_delete(f"{prefix}.{suffix}")


def _every_publish_fails_in_bounded_time(app: Celery) -> None:
    task = app.tasks["capped.noop"]
    before = admissions("capped", "error", "broker_unavailable")
    for i in range(PUBLISHES):
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable) as info:
            task.delay(i)
        elapsed = time.monotonic() - started
        assert elapsed < BOUND, f"publish {i + 1} took {elapsed:.1f}s"
        error = info.value
        assert error.pool == "capped" and error.timeout == 1.0
        assert "broker unavailable, publish gave up within 1s" in str(error)
        assert error.__cause__ is not None
    assert admissions("capped", "error", "broker_unavailable") == before + PUBLISHES


def _publishes_again(app: Celery, timeout: float = 15.0) -> None:
    def published() -> bool:
        try:
            app.tasks["capped.noop"].delay(99)
        except BrokerUnavailable:
            return False
        return True

    wait_for(published, timeout, "a publish after the broker came back")


def _app(url: str, prefix: str = "outage", **conf: Any) -> Celery:
    return make_capped_app(url, prefix, publish_timeout=1.0, **conf)


def test_frozen_redis_fails_every_publish_in_bounded_time(
    private_redis: tuple[subprocess.Popen[bytes], int],
) -> None:
    server, port = private_redis
    app = _app(f"redis://127.0.0.1:{port}/0")
    app.tasks["capped.noop"].delay(0)  # connected and working
    os.kill(server.pid, signal.SIGSTOP)
    try:
        _every_publish_fails_in_bounded_time(app)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    _publishes_again(app)


def test_stopped_redis_fails_every_publish_in_bounded_time(
    private_redis: tuple[subprocess.Popen[bytes], int], tmp_path: Path
) -> None:
    server, port = private_redis
    app = _app(f"redis://127.0.0.1:{port}/0")
    app.tasks["capped.noop"].delay(0)
    server.kill()
    server.wait(timeout=10)
    _every_publish_fails_in_bounded_time(app)
    restarted = _start_redis(port, tmp_path)
    try:
        _publishes_again(app)
    finally:
        restarted.kill()
        restarted.wait(timeout=10)


def test_redis_down_when_the_producer_starts_fails_in_bounded_time() -> None:
    _every_publish_fails_in_bounded_time(_app(f"redis://127.0.0.1:{_free_port()}/0"))


def test_frozen_rabbitmq_fails_every_publish_in_bounded_time(
    rabbitmq_proxy: tuple[FreezableProxy, str],
) -> None:
    """RabbitMQ accepts the connection but never answers: not even the confirm hangs."""
    proxy, prefix = rabbitmq_proxy
    app = _app(proxy.url(), prefix)
    app.tasks["capped.noop"].delay(0)
    proxy.freeze()
    try:
        _every_publish_fails_in_bounded_time(app)
    finally:
        proxy.thaw()
    _publishes_again(app)


def test_stopped_rabbitmq_fails_every_publish_in_bounded_time(
    rabbitmq_proxy: tuple[FreezableProxy, str],
) -> None:
    proxy, prefix = rabbitmq_proxy
    app = _app(proxy.url(), prefix)
    app.tasks["capped.noop"].delay(0)
    proxy.stop()
    _every_publish_fails_in_bounded_time(app)


def test_rabbitmq_down_when_the_producer_starts_fails_in_bounded_time() -> None:
    _every_publish_fails_in_bounded_time(_app(f"amqp://guest:guest@127.0.0.1:{_free_port()}//"))
