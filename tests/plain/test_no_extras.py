"""``pip install celery-bulkhead`` with no extras: a RabbitMQ shop, no redis-py.

CI runs this file in a second virtual environment that has the package and
pytest only (see ``.ci/run``); the main suite's environment has redis-py, so
these tests are not in ``testpaths``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery
from kombu import Connection

from celery_bulkhead import Bulkhead, ConfigurationError, Pool, PoolFull

AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def test_this_environment_has_no_redis_driver() -> None:
    """The premise: without it the other tests would prove nothing."""
    assert importlib.util.find_spec("redis") is None


@pytest.fixture
def queue() -> Iterator[str]:
    name = f"plain-{uuid.uuid4().hex[:8]}"
    yield name
    with Connection(AMQP) as conn:
        for entity in (name, f"{name}.continue"):
            with conn.channel() as channel, contextlib.suppress(conn.channel_errors):
                channel.queue_delete(entity)
        with conn.channel() as channel, contextlib.suppress(conn.channel_errors):
            channel.exchange_delete(name)


def test_the_package_imports_and_caps_a_rabbitmq_pool_exactly(queue: str) -> None:
    app = Celery("plain", broker=AMQP, set_as_current=False)
    app.conf.update(task_ignore_result=True, task_default_queue=f"{queue}.default")
    Bulkhead(app, pools=[Pool("p", max_queue=2, queue=queue)])

    @app.task(bulkhead="p", name="plain.noop", shared=False)
    def noop() -> None: ...

    try:
        noop.delay()
        noop.delay()
        with pytest.raises(PoolFull) as full:
            noop.delay()
        assert (full.value.depth, full.value.cap) == (2, 2)
        with Connection(AMQP) as conn, conn.channel() as channel:
            assert channel.queue_declare(queue=queue, passive=True).message_count == 2
    finally:
        app.close()


def test_a_redis_broker_without_redis_py_names_the_extra_to_install() -> None:
    app = Celery("plain-redis", broker="redis://127.0.0.1:6379/9", set_as_current=False)
    with pytest.raises(ConfigurationError, match=r"pip install 'celery-bulkhead\[redis\]'"):
        Bulkhead(app, pools=[Pool("p", max_queue=2)])
