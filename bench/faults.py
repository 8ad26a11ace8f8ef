"""Fault bench: under each broker fault, how long does a capped publish take to give up?

What is measured
----------------
Each scenario of ``tests/e2e/test_faults.py`` is run ``--repeats`` times (3),
with ``publish_timeout=2`` and, for ``block`` pools, ``block_timeout=3``:

* RabbitMQ through a proxy (:mod:`tests.proxy`) that freezes (stops moving
  bytes) or cuts (closes) at one exact AMQP step of a capped publish: the
  channel open of a process's first connection; the channel open and the
  passive ``queue.declare`` of the reconnect after a ``basic.nack``; the
  confirm wait; a ``block`` publish frozen while it waits for room; a cut
  mid-publish and at the passive declare;
* Redis, a private ``redis-server`` on a free loopback port: frozen with
  ``SIGSTOP`` (3 publishes in a row), killed (3 publishes, then a restart),
  a ``block`` publish frozen while it waits for room;
* both: 25 threads publishing at once with the broker frozen and the default
  ``broker_pool_limit`` (10 producers);
* both: the side door, a task in no pool or in an uncapped pool published
  with ``apply_async(exchange=<capped queue>, routing_key=...)`` or to
  ``<queue>.continue``, into a capped pool (``max_queue=2``) that holds one
  message: the first is admitted, the next ones must be refused.

Reported per scenario, summed over repeats: publish calls made (the fault's
and the set-up's), calls that returned (admitted), calls that raised
(refused: ``PoolFull`` or ``BrokerUnavailable``), admitted messages missing
from the queue afterwards (lost; must be 0), the longest time a call took to
raise, and the nominal bound (``publish_timeout``, or ``publish_timeout +
block_timeout`` for ``block``).  The slack is the longest time minus the
bound.  ``over cap`` counts messages beyond a pool's ``max_queue`` (must be 0).

A call that gave up unconfirmed may still have reached the broker (a frozen
Redis runs the commands it buffered once thawed; a frozen RabbitMQ may have
kept the message): such a message is an extra copy, never a loss.

Usage::

    python bench/faults.py [--repeats 3] [--broker redis|rabbitmq]

Needs ``redis-server`` on the PATH and RabbitMQ on 127.0.0.1:5672 (guest).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from kombu import Connection

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from celery_bulkhead import BrokerUnavailable, Bulkhead, Pool  # noqa: E402
from tests.proxy import (  # noqa: E402
    BASIC_NACK,
    BASIC_PUBLISH,
    CHANNEL_OPEN,
    QUEUE_DECLARE,
    FreezableProxy,
)

PUBLISH_TIMEOUT = 2.0
BLOCK_TIMEOUT = 3.0
CAP = 2
THREADS = 25
HUNG_AFTER = 8.0  # a call still running this long after its bound counts as hung
RABBITMQ = ("127.0.0.1", 5672)
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


def make_app(url: str, prefix: str) -> Celery:
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
    for name, pool in [
        ("capped", "capped"),
        ("blocked", "blocked"),
        ("wide", "wide"),
        ("open", "open"),
        ("loose", None),
    ]:
        options: dict[str, Any] = {"bulkhead": pool} if pool else {}
        app.task(name=f"faults.{name}", shared=False, **options)(_noop)
    return app


def _noop(i: int = 0) -> None: ...


# -- bookkeeping --------------------------------------------------------------------


@dataclass
class Tally:
    """One run of a scenario: what was published, what came back, what the queue holds."""

    published: int = 0
    admitted: int = 0
    refused: int = 0
    hung: int = 0
    raise_times: list[float] = field(default_factory=list)
    errors: set[str] = field(default_factory=set)
    depth: int = 0
    cap: int | None = CAP

    @property
    def lost(self) -> int:
        return max(self.admitted - self.depth, 0)

    @property
    def over_cap(self) -> int:
        return 0 if self.cap is None else max(self.depth - self.cap, 0)


def run_calls(calls: list[Callable[[], Any]], bound: float, tally: Tally) -> None:
    """All calls at once, one thread each; counts them into ``tally``."""
    results: list[tuple[float, BaseException | None] | None] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        barrier.wait()
        started = time.monotonic()
        try:
            calls[i]()
        except Exception as exc:
            results[i] = (time.monotonic() - started, exc)
        else:
            results[i] = (time.monotonic() - started, None)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    give_up = time.monotonic() + bound + HUNG_AFTER
    for thread in threads:
        thread.join(timeout=max(give_up - time.monotonic(), 0.0))
    for result in results:
        tally.published += 1
        if result is None:
            tally.hung += 1
            tally.refused += 1
            tally.raise_times.append(bound + HUNG_AFTER)
            tally.errors.add("hung")
            continue
        elapsed, error = result
        if error is None:
            tally.admitted += 1
        else:
            tally.refused += 1
            tally.raise_times.append(elapsed)
            tally.errors.add(type(error).__name__)


def call(fn: Callable[[], Any], bound: float, tally: Tally) -> None:
    run_calls([fn], bound, tally)


def ready(url: str, queue: str) -> int:
    with Connection(url, connect_timeout=5) as conn, conn.channel() as channel:
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except conn.channel_errors:
            return 0


def wait_publishes(app: Celery, task: str = "faults.wide", timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            app.tasks[task].delay(99)
            return
        except BrokerUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# -- brokers ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    def __init__(self, directory: str) -> None:
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
                *("--save", "", "--appendonly", "no", "--dir", self.directory),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the private redis-server did not start")
            time.sleep(0.05)
        client.close()

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

    def ensure_running(self) -> None:
        self.thaw()
        if self.process is None:
            self.start()


@contextlib.contextmanager
def rabbitmq_proxy() -> Iterator[tuple[FreezableProxy, str]]:
    proxy = FreezableProxy(RABBITMQ)
    prefix = f"bhfb{uuid.uuid4().hex[:8]}"
    try:
        yield proxy, prefix
    finally:
        proxy.stop()
        with Connection(RABBITMQ_URL) as conn:
            for pool in ("capped", "blocked", "wide", "open"):
                for name in (f"{prefix}.{pool}", f"{prefix}.{pool}.continue"):
                    with conn.channel() as channel, contextlib.suppress(conn.channel_errors):
                        channel.queue_delete(name)
                    with conn.channel() as channel, contextlib.suppress(conn.channel_errors):
                        channel.exchange_delete(name)


# -- scenarios ----------------------------------------------------------------------

Scenario = Callable[[], "Tally | list[Tally]"]


def rabbitmq_fault(fault: str, setup: str) -> Scenario:
    def run() -> Tally:
        tally = Tally()
        with rabbitmq_proxy() as (proxy, prefix):
            app = make_app(proxy.url(), prefix)
            task = app.tasks["faults.capped"]
            for i in range({"full": CAP, "room": 1, "fresh": 0}[setup]):
                call(lambda i=i: task.delay(i), PUBLISH_TIMEOUT, tally)
            armed = {
                "channel.open": lambda: proxy.freeze_at(CHANNEL_OPEN),
                "passive declare": lambda: proxy.freeze_at(QUEUE_DECLARE),
                "confirm wait": lambda: proxy.freeze_at(BASIC_PUBLISH, deliver=True),
                "cut publish": lambda: proxy.cut_at(BASIC_PUBLISH),
                "cut declare": lambda: proxy.cut_at(QUEUE_DECLARE),
            }[fault]
            proxy.seen.clear()
            fired = armed()
            try:
                call(lambda: task.delay(9), PUBLISH_TIMEOUT, tally)
            finally:
                proxy.thaw()
            if not fired.is_set() or (setup == "full" and ("broker", BASIC_NACK) not in proxy.seen):
                tally.errors.add("fault missed")
            tally.depth = ready(RABBITMQ_URL, f"{prefix}.capped")
        return tally

    return run


def rabbitmq_block() -> Tally:
    tally = Tally()
    with rabbitmq_proxy() as (proxy, prefix):
        app = make_app(proxy.url(), prefix)
        task = app.tasks["faults.blocked"]
        for i in range(CAP):
            call(lambda i=i: task.delay(i), PUBLISH_TIMEOUT, tally)
        timer = threading.Timer(0.5, lambda: proxy.freeze_at(CHANNEL_OPEN))
        timer.start()
        try:
            call(lambda: task.delay(9), PUBLISH_TIMEOUT + BLOCK_TIMEOUT, tally)
        finally:
            timer.cancel()
            proxy.thaw()
        tally.depth = ready(RABBITMQ_URL, f"{prefix}.blocked")
    return tally


def redis_frozen(server: PrivateRedis) -> Scenario:
    def run() -> Tally:
        tally = Tally(cap=None)
        prefix = f"bhfb{uuid.uuid4().hex[:8]}"
        app = make_app(server.url, prefix)
        task = app.tasks["faults.wide"]
        call(lambda: task.delay(0), PUBLISH_TIMEOUT, tally)
        server.freeze()
        try:
            for i in range(3):
                call(lambda i=i: task.delay(i), PUBLISH_TIMEOUT, tally)
        finally:
            server.thaw()
        tally.depth = ready(server.url, f"{prefix}.wide")
        return tally

    return run


def redis_block(server: PrivateRedis) -> Scenario:
    def run() -> Tally:
        tally = Tally()
        prefix = f"bhfb{uuid.uuid4().hex[:8]}"
        app = make_app(server.url, prefix)
        task = app.tasks["faults.blocked"]
        for i in range(CAP):
            call(lambda i=i: task.delay(i), PUBLISH_TIMEOUT, tally)
        timer = threading.Timer(0.5, server.freeze)
        timer.start()
        try:
            call(lambda: task.delay(9), PUBLISH_TIMEOUT + BLOCK_TIMEOUT, tally)
        finally:
            timer.cancel()
            server.thaw()
        tally.depth = ready(server.url, f"{prefix}.blocked")
        return tally

    return run


def redis_killed(server: PrivateRedis) -> Scenario:
    def run() -> Tally:
        tally = Tally(cap=None)
        prefix = f"bhfb{uuid.uuid4().hex[:8]}"
        app = make_app(server.url, prefix)
        task = app.tasks["faults.wide"]
        server.kill()
        for i in range(3):
            call(lambda i=i: task.delay(i), PUBLISH_TIMEOUT, tally)
        server.start()
        try:
            wait_publishes(app)  # after the restart: publishing works again
        except BrokerUnavailable:
            tally.errors.add("never recovered")
        else:
            tally.published += 1
            tally.admitted += 1
        tally.depth = ready(server.url, f"{prefix}.wide")
        return tally

    return run


def threads_frozen(
    url: Callable[[], str],
    freeze: Callable[[], None],
    thaw: Callable[[], None],
    depth: Callable[[str], int],
) -> Tally:
    tally = Tally(cap=None)
    prefix = f"bhfb{uuid.uuid4().hex[:8]}"
    app = make_app(url(), prefix)
    task = app.tasks["faults.wide"]
    call(lambda: task.delay(0), PUBLISH_TIMEOUT, tally)
    freeze()
    try:
        run_calls([lambda i=i: task.delay(i) for i in range(THREADS)], PUBLISH_TIMEOUT, tally)
    finally:
        thaw()
    tally.depth = depth(f"{prefix}.wide")
    return tally


SIDE_DOORS = [
    ("faults.loose", {"exchange": "Q", "routing_key": "Q"}),
    ("faults.open", {"exchange": "Q", "routing_key": "Q"}),
    ("faults.capped", {"queue": "Q.continue"}),
    ("faults.loose", {"queue": "Q.continue"}),
    ("faults.loose", {"exchange": "Q", "routing_key": "Q.continue"}),
]


def side_door(url: str, depth_url: str) -> list[Tally]:
    """Per door: one capped publish, then three side-door publishes (1 admitted, 2 refused)."""
    return [_door(url, depth_url, task_name, template) for task_name, template in SIDE_DOORS]


def _door(url: str, depth_url: str, task_name: str, template: dict[str, str]) -> Tally:
    prefix = f"bhfb{uuid.uuid4().hex[:8]}"
    app = make_app(url, prefix)
    queue = f"{prefix}.capped"
    options = {key: value.replace("Q", queue) for key, value in template.items()}
    tally = Tally()
    call(lambda: app.tasks["faults.capped"].delay(0), PUBLISH_TIMEOUT, tally)
    for i in range(1, 4):
        call(
            lambda i=i: app.tasks[task_name].apply_async((i,), **options),
            PUBLISH_TIMEOUT,
            tally,
        )
    # New work sent to <queue>.continue must land in <queue> (capped), never there.
    tally.depth = ready(depth_url, queue) + ready(depth_url, f"{queue}.continue")
    if url.startswith("amqp"):
        _delete_queues(prefix)
    return tally


def _delete_queues(prefix: str) -> None:
    with Connection(RABBITMQ_URL) as conn:
        for pool in ("capped", "blocked", "wide", "open"):
            for name in (f"{prefix}.{pool}", f"{prefix}.{pool}.continue"):
                with conn.channel() as channel, contextlib.suppress(conn.channel_errors):
                    channel.queue_delete(name)


# -- the run ------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    broker: str
    bound: float
    tallies: list[Tally] = field(default_factory=list)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], default=None)
    args = parser.parse_args()
    both = PUBLISH_TIMEOUT + BLOCK_TIMEOUT
    with tempfile.TemporaryDirectory() as directory:
        server = PrivateRedis(directory)
        try:
            return _run(args, server, both)
        finally:
            server.ensure_running()
            assert server.process is not None
            server.process.kill()
            server.process.wait(timeout=10)


def _run(args: argparse.Namespace, server: PrivateRedis, both: float) -> int:
    plan: list[tuple[str, str, float, Scenario]] = [
        (
            "frozen at channel.open, first connection",
            "rabbitmq",
            PUBLISH_TIMEOUT,
            rabbitmq_fault("channel.open", "fresh"),
        ),
        (
            "frozen at channel.open after a nack",
            "rabbitmq",
            PUBLISH_TIMEOUT,
            rabbitmq_fault("channel.open", "full"),
        ),
        (
            "frozen at the passive declare after a nack",
            "rabbitmq",
            PUBLISH_TIMEOUT,
            rabbitmq_fault("passive declare", "full"),
        ),
        (
            "frozen during the confirm wait",
            "rabbitmq",
            PUBLISH_TIMEOUT,
            rabbitmq_fault("confirm wait", "room"),
        ),
        ("cut mid-publish", "rabbitmq", PUBLISH_TIMEOUT, rabbitmq_fault("cut publish", "room")),
        (
            "cut at the passive declare after a nack",
            "rabbitmq",
            PUBLISH_TIMEOUT,
            rabbitmq_fault("cut declare", "full"),
        ),
        ("block, frozen while waiting for room", "rabbitmq", both, rabbitmq_block),
        ("frozen, 3 publishes in a row", "redis", PUBLISH_TIMEOUT, redis_frozen(server)),
        ("killed, 3 publishes, then restarted", "redis", PUBLISH_TIMEOUT, redis_killed(server)),
        ("block, frozen while waiting for room", "redis", both, redis_block(server)),
        (
            f"{THREADS} threads, frozen, 10 producers",
            "redis",
            PUBLISH_TIMEOUT,
            lambda: threads_frozen(
                lambda: server.url, server.freeze, server.thaw, lambda q: ready(server.url, q)
            ),
        ),
        (
            f"{THREADS} threads, frozen, 10 producers",
            "rabbitmq",
            PUBLISH_TIMEOUT,
            _threads_rabbitmq,
        ),
        (
            "side door into a full capped pool",
            "redis",
            PUBLISH_TIMEOUT,
            lambda: side_door(server.url, server.url),
        ),
        (
            "side door into a full capped pool",
            "rabbitmq",
            PUBLISH_TIMEOUT,
            lambda: side_door(RABBITMQ_URL, RABBITMQ_URL),
        ),
    ]
    rows: list[Row] = []
    for scenario, broker, bound, run in plan:
        if args.broker and broker != args.broker:
            continue
        row = Row(scenario, broker, bound)
        for _ in range(args.repeats):
            server.ensure_running()
            result = run()
            row.tallies += result if isinstance(result, list) else [result]
        rows.append(row)
        print(f"  done: {broker} / {scenario}", file=sys.stderr, flush=True)
    return _report(rows)


def _threads_rabbitmq() -> Tally:
    with rabbitmq_proxy() as (proxy, prefix):
        tally = Tally(cap=None)
        app = make_app(proxy.url(), prefix)
        task = app.tasks["faults.wide"]
        call(lambda: task.delay(0), PUBLISH_TIMEOUT, tally)
        proxy.freeze()
        try:
            run_calls([lambda i=i: task.delay(i) for i in range(THREADS)], PUBLISH_TIMEOUT, tally)
        finally:
            proxy.thaw()
        tally.depth = ready(RABBITMQ_URL, f"{prefix}.wide")
        return tally


def _report(rows: list[Row]) -> int:
    header = (
        "scenario",
        "broker",
        "published",
        "admitted",
        "refused",
        "lost",
        "over cap",
        "max time to raise (s)",
        "bound (s)",
        "slack (s)",
        "errors",
    )
    table = [header]
    failed = False
    for row in rows:
        tallies = row.tallies
        slowest = max((t for tally in tallies for t in tally.raise_times), default=0.0)
        lost = sum(tally.lost for tally in tallies)
        over = sum(tally.over_cap for tally in tallies)
        errors = sorted({e for tally in tallies for e in tally.errors})
        slack = slowest - row.bound
        failed |= lost > 0 or over > 0 or slowest > row.bound + 1.5
        table.append(
            (
                row.scenario,
                row.broker,
                str(sum(t.published for t in tallies)),
                str(sum(t.admitted for t in tallies)),
                str(sum(t.refused for t in tallies)),
                str(lost),
                str(over),
                f"{slowest:.2f}" if slowest else "-",
                f"{row.bound:.1f}",
                f"{slack:+.2f}" if slowest else "-",
                ", ".join(errors),
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for n, line in enumerate(table):
        print(" | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
        if n == 0:
            print("-+-".join("-" * width for width in widths))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
