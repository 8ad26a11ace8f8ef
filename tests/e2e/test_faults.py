"""Admission keeps every promise under faults: a time bound, a clear error, nothing lost.

Each test injects one fault into a real broker while capped publishes are in
flight and checks three things:

* **the bound**: every publish call returns or raises within its nominal
  bound (``publish_timeout``; ``publish_timeout + block_timeout`` for a
  ``block`` publish) plus :data:`SLACK`;
* **the error**: :class:`BrokerUnavailable` when the broker cannot answer,
  :class:`PoolFull` when it answered that the queue is full;
* **nothing lost**: once the fault clears, the queue holds at least every
  publish that returned normally, at most those plus the publishes that gave
  up unconfirmed (the broker may have kept them: at least once), and never
  more than the cap.

Redis faults use a private ``redis-server`` (frozen with ``SIGSTOP``, killed,
restarted), shared by the module; RabbitMQ faults a proxy in front of the
shared broker (:mod:`tests.proxy`) that freezes or cuts at one exact AMQP step.
A call that is still running long after its bound is reported as hung, never
waited for, so the file also runs (and fails in bounded time) on older code.
The file uses the public API only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection

from celery_bulkhead import BrokerUnavailable, Bulkhead, Pool, PoolFull
from tests.proxy import (
    BASIC_NACK,
    BASIC_PUBLISH,
    CHANNEL_OPEN,
    QUEUE_DECLARE,
    FreezableProxy,
)
from tests.support import BROKERS, wait_for

PUBLISH_TIMEOUT = 2.0
BLOCK_TIMEOUT = 3.0
#: Worst overshoot allowed over a nominal bound.  Measured: at most ~0.1 s
#: (see docs/admission.md, "Faults and time bounds"); the margin is for a loaded CI.
SLACK = 1.5
CAP = 2
THREADS = 25
#: A call still running this long after its bound is reported as hung, not awaited.
HUNG_AFTER = 8.0


# -- the app -----------------------------------------------------------------------


def make_app(url: str, prefix: str) -> Celery:
    """Capped pools (reject, block, wide), an uncapped pool and a task in no pool."""
    app = Celery(f"faults-{prefix}", broker=url, set_as_current=False)
    app.conf.update(task_ignore_result=True, task_default_queue=f"{prefix}.default")
    Bulkhead(
        app,
        pools=[
            Pool("capped", max_queue=CAP, queue=f"{prefix}.capped"),
            Pool(
                "blocked",
                max_queue=CAP,
                on_full="block",
                block_timeout=BLOCK_TIMEOUT,
                queue=f"{prefix}.blocked",
            ),
            Pool("wide", max_queue=1000, queue=f"{prefix}.wide"),
            Pool("open", queue=f"{prefix}.open"),
        ],
        publish_timeout=PUBLISH_TIMEOUT,
    )

    @app.task(bulkhead="capped", name="faults.capped", shared=False)
    def capped(i: int = 0) -> None: ...

    @app.task(bulkhead="blocked", name="faults.blocked", shared=False)
    def blocked(i: int = 0) -> None: ...

    @app.task(bulkhead="wide", name="faults.wide", shared=False)
    def wide(i: int = 0) -> None: ...

    @app.task(bulkhead="open", name="faults.open", shared=False)
    def uncapped(i: int = 0) -> None: ...

    @app.task(name="faults.loose", shared=False)
    def loose(i: int = 0) -> None: ...

    return app


# -- timing and bookkeeping ----------------------------------------------------------


@dataclass
class Outcome:
    """How one publish call ended, and after how long."""

    elapsed: float
    error: BaseException | None = None
    hung: bool = False

    def describe(self) -> str:
        if self.hung:
            return f"still running after {self.elapsed:.1f}s (hung)"
        ended = "returned" if self.error is None else f"raised {type(self.error).__name__}"
        return f"{ended} after {self.elapsed:.2f}s"


def run_timed(calls: list[Callable[[], Any]], bound: float) -> list[Outcome]:
    """Start every call at once, each in its own thread; never wait past ``bound + HUNG_AFTER``."""
    outcomes: list[Outcome | None] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))
    started = [0.0] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        started[i] = time.monotonic()
        try:
            calls[i]()
        except Exception as exc:
            outcomes[i] = Outcome(time.monotonic() - started[i], exc)
        else:
            outcomes[i] = Outcome(time.monotonic() - started[i])

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    give_up = time.monotonic() + bound + HUNG_AFTER
    for thread in threads:
        thread.join(timeout=max(give_up - time.monotonic(), 0.0))
    now = time.monotonic()
    return [
        outcome if outcome is not None else Outcome(now - started[i], hung=True)
        for i, outcome in enumerate(outcomes)
    ]


def timed(call: Callable[[], Any], bound: float) -> Outcome:
    return run_timed([call], bound)[0]


@dataclass
class Ledger:
    """What a queue must hold afterwards: every publish that returned, never more than the cap."""

    cap: int
    admitted: int = 0  # returned normally
    unconfirmed: int = 0  # gave up with BrokerUnavailable: the broker may have kept it
    outcomes: list[Outcome] = field(default_factory=list)

    def record(self, outcome: Outcome) -> Outcome:
        self.outcomes.append(outcome)
        if outcome.error is None and not outcome.hung:
            self.admitted += 1
        elif outcome.hung or isinstance(outcome.error, BrokerUnavailable):
            self.unconfirmed += 1
        return outcome

    def check(self, depth: int) -> None:
        assert self.admitted <= depth, f"lost: {self.admitted} admitted, {depth} in the queue"
        assert depth <= self.admitted + self.unconfirmed, (
            f"{depth} in the queue, only {self.admitted} admitted + {self.unconfirmed} unconfirmed"
        )
        assert depth <= self.cap, f"{depth} in a queue capped at {self.cap}"


def assert_within(outcome: Outcome, bound: float, error: type[BaseException] | None) -> None:
    """Ended within ``bound + SLACK``, returning (``error`` None) or raising ``error``."""
    what = outcome.describe()
    assert not outcome.hung, what
    assert outcome.elapsed <= bound + SLACK, f"{what}; bound {bound}s + {SLACK}s"
    if error is None:
        assert outcome.error is None, what
    else:
        assert isinstance(outcome.error, error), f"{what}: {outcome.error!r}"
    if isinstance(outcome.error, BrokerUnavailable):
        assert outcome.error.timeout == PUBLISH_TIMEOUT
        assert outcome.error.__cause__ is not None


def ready(url: str, queue: str) -> int:
    """Ready messages in ``queue`` as the broker counts them (0 when it does not exist)."""
    with Connection(url, connect_timeout=5) as conn, conn.channel() as channel:
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except conn.channel_errors:
            return 0


def fill(app: Celery, task: str, ledger: Ledger, n: int = CAP) -> None:
    for i in range(n):
        ledger.record(timed(lambda i=i: app.tasks[task].delay(i), PUBLISH_TIMEOUT))
    assert ledger.admitted == n, [o.describe() for o in ledger.outcomes]


def publishes_again(app: Celery, task: str = "faults.wide") -> None:
    """Once the fault clears, a capped publish goes through (within a few tries)."""

    def published() -> bool:
        try:
            app.tasks[task].delay(99)
        except BrokerUnavailable:
            return False
        return True

    wait_for(published, 15, "a capped publish after the fault cleared")


# -- brokers -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of this module's own on a free loopback port: freeze, kill, restart."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                *("--bind", "127.0.0.1", "--port", str(self.port)),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=1)
        wait_for(lambda: self._pings(client), 10, "the private redis-server")
        client.close()

    @staticmethod
    def _pings(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def freeze(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        assert self.process is not None
        self.thaw()
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def close(self) -> None:
        if self.process is not None:
            self.kill()


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    yield server
    server.close()


@pytest.fixture
def redis_server(private_redis: PrivateRedis) -> Iterator[PrivateRedis]:
    """The module's redis-server, running and answering again after each test."""
    yield private_redis
    private_redis.thaw()
    if private_redis.process is None:
        private_redis.start()


class Broker:
    """One broker behind a fault switch: ``freeze()``/``thaw()``, and its queues' depths."""

    def __init__(self, name: str, url: str, direct_url: str, prefix: str) -> None:
        self.name = name
        self.url = url  # what the app publishes to (through the fault)
        self.direct_url = direct_url  # what the test counts with (around the fault)
        self.prefix = prefix
        self.freeze: Callable[[], None] = lambda: None
        self.thaw: Callable[[], None] = lambda: None

    def depth(self, pool: str) -> int:
        return ready(self.direct_url, f"{self.prefix}.{pool}")


def _delete_rabbitmq_queues(prefix: str) -> None:
    with Connection(BROKERS["rabbitmq"]) as conn:
        for pool in ("capped", "blocked", "wide", "open"):
            for name in (f"{prefix}.{pool}", f"{prefix}.{pool}.continue"):
                with conn.channel() as channel, contextlib.suppress(conn.channel_errors):
                    channel.queue_delete(name)
                with conn.channel() as channel, contextlib.suppress(conn.channel_errors):
                    channel.exchange_delete(name)


@pytest.fixture
def rabbitmq() -> Iterator[tuple[FreezableProxy, Broker]]:
    """A proxy to the shared RabbitMQ, with queues of the test's own (deleted after)."""
    proxy = FreezableProxy(("127.0.0.1", 5672))
    prefix = f"bhf{uuid.uuid4().hex[:8]}"
    broker = Broker("rabbitmq", proxy.url(), BROKERS["rabbitmq"], prefix)
    broker.freeze, broker.thaw = proxy.freeze, proxy.thaw
    yield proxy, broker
    proxy.stop()
    _delete_rabbitmq_queues(prefix)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """Each broker, frozen on demand: a private redis-server, or RabbitMQ behind a proxy."""
    if request.param == "redis":
        server: PrivateRedis = request.getfixturevalue("redis_server")
        prefix = f"bhf{uuid.uuid4().hex[:8]}"
        redis_broker = Broker("redis", server.url, server.url, prefix)
        redis_broker.freeze, redis_broker.thaw = server.freeze, server.thaw
        yield redis_broker
        server.thaw()
    else:
        _, rabbitmq_broker = request.getfixturevalue("rabbitmq")
        yield rabbitmq_broker


# -- 1. RabbitMQ: a fault at each step of a capped publish ----------------------------


#: fault -> (what the queue holds first, what the publish must end with)
RABBITMQ_FAULTS: dict[str, tuple[str, type[BaseException] | None]] = {
    # The first publish of a process: the handshake goes through, then nothing.
    "freeze at channel.open of the first connection": ("fresh", BrokerUnavailable),
    # After a basic.nack the confirm connection is closed; the next attempt
    # reconnects, and the broker freezes once the handshake is done.
    "freeze at channel.open after the nack": ("full", BrokerUnavailable),
    "freeze at the passive queue.declare after the nack": ("full", BrokerUnavailable),
    "freeze during the confirm wait": ("room", BrokerUnavailable),
    "cut mid-publish": ("room", None),
    "cut at the passive queue.declare after the nack": ("full", PoolFull),
}


def arm(proxy: FreezableProxy, fault: str) -> threading.Event:
    """Arm ``fault`` on the proxy; the event is set when it happens."""
    if fault.startswith("freeze at channel.open"):
        return proxy.freeze_at(CHANNEL_OPEN)
    if fault == "freeze at the passive queue.declare after the nack":
        return proxy.freeze_at(QUEUE_DECLARE)
    if fault == "freeze during the confirm wait":
        return proxy.freeze_at(BASIC_PUBLISH, deliver=True)  # published, never confirmed
    if fault == "cut mid-publish":
        return proxy.cut_at(BASIC_PUBLISH)
    assert fault == "cut at the passive queue.declare after the nack"
    return proxy.cut_at(QUEUE_DECLARE)


@pytest.mark.parametrize("fault", list(RABBITMQ_FAULTS))
def test_rabbitmq_reject_fault_at_each_step_ends_within_publish_timeout(
    rabbitmq: tuple[FreezableProxy, Broker], fault: str
) -> None:
    """A capped publish ends within publish_timeout + slack, whichever step the fault hits."""
    proxy, broker = rabbitmq
    setup, expected = RABBITMQ_FAULTS[fault]
    app = make_app(broker.url, broker.prefix)
    ledger = Ledger(CAP)
    if setup == "full":
        fill(app, "faults.capped", ledger)
    elif setup == "room":
        fill(app, "faults.capped", ledger, 1)
    proxy.seen.clear()
    fired = arm(proxy, fault)
    try:
        outcome = ledger.record(timed(lambda: app.tasks["faults.capped"].delay(1), PUBLISH_TIMEOUT))
        assert fired.is_set(), f"the fault never happened: {proxy.seen}"
        if setup == "full":
            assert ("broker", BASIC_NACK) in proxy.seen, "the publish was never nacked"
        assert_within(outcome, PUBLISH_TIMEOUT, expected)
    finally:
        proxy.thaw()
    ledger.check(broker.depth("capped"))
    publishes_again(app)


def test_rabbitmq_block_frozen_while_waiting_for_room_ends_within_both_timeouts(
    rabbitmq: tuple[FreezableProxy, Broker],
) -> None:
    """Frozen after a reconnect mid-wait: BrokerUnavailable by publish_timeout + block_timeout."""
    proxy, broker = rabbitmq
    app = make_app(broker.url, broker.prefix)
    ledger = Ledger(CAP)
    fill(app, "faults.blocked", ledger)
    proxy.seen.clear()

    def freeze_mid_wait() -> None:
        time.sleep(0.5)  # waiting for room: nack, reconnect, passive declare, pause, again
        proxy.freeze_at(CHANNEL_OPEN)

    threading.Thread(target=freeze_mid_wait, daemon=True).start()
    bound = PUBLISH_TIMEOUT + BLOCK_TIMEOUT
    try:
        outcome = ledger.record(timed(lambda: app.tasks["faults.blocked"].delay(1), bound))
        assert ("broker", BASIC_NACK) in proxy.seen, "the publish never waited for room"
        assert_within(outcome, bound, BrokerUnavailable)
    finally:
        proxy.thaw()
    ledger.check(broker.depth("blocked"))
    publishes_again(app)


# -- 2. Redis: frozen, killed, restarted ------------------------------------------------


def test_redis_frozen_every_publish_ends_within_publish_timeout(
    redis_server: PrivateRedis,
) -> None:
    """Not only the first publish after the freeze: each one, and publishing resumes after."""
    prefix = f"bhf{uuid.uuid4().hex[:8]}"
    app = make_app(redis_server.url, prefix)
    ledger = Ledger(cap=1000)
    ledger.record(timed(lambda: app.tasks["faults.wide"].delay(0), PUBLISH_TIMEOUT))
    redis_server.freeze()
    try:
        for i in range(3):
            outcome = ledger.record(
                timed(lambda i=i: app.tasks["faults.wide"].delay(i), PUBLISH_TIMEOUT)
            )
            assert_within(outcome, PUBLISH_TIMEOUT, BrokerUnavailable)
    finally:
        redis_server.thaw()
    publishes_again(app)
    ledger.admitted += 1
    ledger.check(ready(redis_server.url, f"{prefix}.wide"))


def test_redis_block_frozen_mid_wait_ends_within_both_timeouts(
    redis_server: PrivateRedis,
) -> None:
    prefix = f"bhf{uuid.uuid4().hex[:8]}"
    app = make_app(redis_server.url, prefix)
    ledger = Ledger(CAP)
    fill(app, "faults.blocked", ledger)
    freezer = threading.Timer(0.5, redis_server.freeze)
    freezer.start()
    bound = PUBLISH_TIMEOUT + BLOCK_TIMEOUT
    try:
        outcome = ledger.record(timed(lambda: app.tasks["faults.blocked"].delay(1), bound))
        assert_within(outcome, bound, BrokerUnavailable)
    finally:
        freezer.cancel()
        redis_server.thaw()
    ledger.check(ready(redis_server.url, f"{prefix}.blocked"))


def test_redis_killed_every_publish_ends_within_publish_timeout_and_resumes_after_restart(
    redis_server: PrivateRedis,
) -> None:
    prefix = f"bhf{uuid.uuid4().hex[:8]}"
    app = make_app(redis_server.url, prefix)
    app.tasks["faults.wide"].delay(0)
    redis_server.kill()
    for i in range(3):
        outcome = timed(lambda i=i: app.tasks["faults.wide"].delay(i), PUBLISH_TIMEOUT)
        assert_within(outcome, PUBLISH_TIMEOUT, BrokerUnavailable)
    redis_server.start()  # empty: the killed server kept nothing
    publishes_again(app)
    assert ready(redis_server.url, f"{prefix}.wide") == 1


# -- 3. Many threads, few producers, a frozen broker --------------------------------------


def test_threads_beyond_the_producer_pool_each_end_within_publish_timeout(broker: Broker) -> None:
    """25 threads, broker_pool_limit 10: the wait for a producer is part of each one's bound."""
    app = make_app(broker.url, broker.prefix)
    assert app.conf.broker_pool_limit == 10
    ledger = Ledger(cap=1000)
    ledger.record(timed(lambda: app.tasks["faults.wide"].delay(0), PUBLISH_TIMEOUT))
    broker.freeze()
    try:
        calls = [lambda i=i: app.tasks["faults.wide"].delay(i) for i in range(THREADS)]
        outcomes = [ledger.record(o) for o in run_timed(calls, PUBLISH_TIMEOUT)]
    finally:
        broker.thaw()
    slowest = max(outcomes, key=lambda o: o.elapsed)
    for outcome in outcomes:
        assert_within(outcome, PUBLISH_TIMEOUT, BrokerUnavailable)
    assert slowest.elapsed <= PUBLISH_TIMEOUT + SLACK
    publishes_again(app)
    ledger.admitted += 1
    ledger.check(broker.depth("wide"))


# -- 4. The side door: an explicit exchange and routing key into a capped queue -----------


@pytest.mark.parametrize(
    "door",
    [
        "no pool, exchange and routing key",
        "uncapped pool, exchange and routing key",
        "a pool task, queue=<queue>.continue",
        "no pool, queue=<queue>.continue",
        "no pool, routing key <queue>.continue",
    ],
)
def test_side_door_into_a_capped_queue_meets_the_cap(broker: Broker, door: str) -> None:
    """Below the cap it is admitted and counted; at the cap it is refused (PoolFull)."""
    app = make_app(broker.url, broker.prefix)
    queue = f"{broker.prefix}.capped"
    task, options = {
        "no pool, exchange and routing key": ("faults.loose", {"exchange": queue}),
        "uncapped pool, exchange and routing key": ("faults.open", {"exchange": queue}),
        "a pool task, queue=<queue>.continue": ("faults.capped", {"queue": f"{queue}.continue"}),
        "no pool, queue=<queue>.continue": ("faults.loose", {"queue": f"{queue}.continue"}),
        "no pool, routing key <queue>.continue": (
            "faults.loose",
            {"exchange": queue, "routing_key": f"{queue}.continue"},
        ),
    }[door]
    if "exchange" in options:
        options.setdefault("routing_key", queue)
    ledger = Ledger(CAP)
    ledger.record(timed(lambda: app.tasks["faults.capped"].delay(0), PUBLISH_TIMEOUT))

    def side_door(i: int) -> Any:
        return app.tasks[task].apply_async((i,), **options)

    below = ledger.record(timed(lambda: side_door(1), PUBLISH_TIMEOUT))
    assert_within(below, PUBLISH_TIMEOUT, None)
    for i in range(2, 4):
        full = ledger.record(timed(lambda i=i: side_door(i), PUBLISH_TIMEOUT))
        assert_within(full, PUBLISH_TIMEOUT, PoolFull)
        assert isinstance(full.error, PoolFull)
        assert full.error.pool == "capped" and full.error.cap == CAP
    assert broker.depth("capped") == CAP
    assert broker.depth("capped.continue") == 0
    ledger.check(broker.depth("capped"))
