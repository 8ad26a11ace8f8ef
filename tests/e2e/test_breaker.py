"""The fleet-wide circuit breaker, with real worker processes and a real HTTP downstream.

The main scenario runs a fleet of two ``celery -A tests.app.breaker_fleet
bulkhead worker --pool hooks`` nodes (prefork, 4 processes each) on each
broker (RabbitMQ with the breaker state in Redis), against a local HTTP
server that fails and then recovers: the breaker opens once for the whole
fleet, the dead downstream sees only the calls the documentation allows,
and every task that was deferred runs exactly once after recovery.  Single
nodes then check what each ``on_open`` does, that a threads pool runs its
guarded calls concurrently, what a node does when the state store is down,
and the rate rules: a downstream failing half its calls, or answering
slowly, opens a breaker whose ``fail_max`` is far away, while successes
through a rate window still cost no Redis call per task.  Call times come
from the downstream's own log, on this machine's monotonic clock.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection
from prometheus_client.parser import text_string_to_metric_families

from celery_bulkhead import CircuitOpen
from tests.app.breaker_fleet import DEFAULTS, POOL, RECORDS_URL, make_fleet_app
from tests.e2e.conftest import Records, WorkerProcess
from tests.support import BROKERS, ROOT, WORKER_FLAGS, wait_for

STARTUP = 60.0
#: How long a failing call takes: longer than cache_seconds (0.2 s), so each
#: execution slot starts at most one call on a stale "closed".
FAIL_DELAY = 0.25
NODES, CONCURRENCY = 2, 4
OUTAGE = 5.0  # seconds the downstream stays down after the breaker opened

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _scrape(port: int) -> Samples | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


# -- the downstream -------------------------------------------------------------------


@dataclass
class Hit:
    start: float  # time.monotonic() of this process
    end: float
    status: int
    tag: str


class Downstream:
    """A local HTTP server that answers 200, or 500 after ``FAIL_DELAY``, or slowly."""

    def __init__(self) -> None:
        self.failing = False
        self.fail_every = 0  # > 0: every fail_every-th call fails (2: half of them)
        self.delay = 0.0  # for 200s
        self.hang = 0.0  # before any answer: a downstream that hangs
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        self._calls = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                start = time.monotonic()
                with owner._lock:
                    owner._calls += 1
                    nth = owner._calls
                time.sleep(owner.hang)
                failing = owner.failing or (owner.fail_every > 0 and nth % owner.fail_every == 0)
                time.sleep(FAIL_DELAY if failing else owner.delay)
                status = 500 if failing else 200
                tag = self.path.partition("tag=")[2]
                with owner._lock:
                    owner.hits.append(Hit(start, time.monotonic(), status, tag))
                with contextlib.suppress(OSError):  # a caller killed at its time limit
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def failures(self, since: float = -math.inf) -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if h.status == 500 and h.start >= since]

    def successes(self) -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if h.status == 200]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- a scenario: an app, its workers, its records ---------------------------------------


@dataclass
class Scenario:
    """One broker, one prefix, one breaker: the producer app and the nodes serving it."""

    broker: str
    prefix: str
    downstream: Downstream
    tmp: Path
    records: Records
    breaker: dict[str, Any]
    options: dict[str, Any]
    state: redis.Redis
    app: Celery = field(init=False)
    workers: list[WorkerProcess] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.app = make_fleet_app(
            self.url,
            self.prefix,
            breaker=self.breaker,
            **{
                k: v
                for k, v in self.options.items()
                if k in ("state_url", "capped", "results", "time_limit", "publish_timeout")
            },
        )

    @property
    def url(self) -> str:
        return BROKERS[self.broker]

    @property
    def name(self) -> str:
        return str(self.breaker.get("name", f"{self.prefix}-downstream"))

    @property
    def queue(self) -> str:
        return f"{self.prefix}.{POOL}"

    @property
    def settings(self) -> dict[str, Any]:
        return {**DEFAULTS, **self.breaker}

    def start(self, hostname: str) -> int:
        """Start one ``bulkhead worker --pool hooks`` node; returns its metrics port."""
        port = _free_port()
        opts = self.options
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "BULKHEAD_TEST_BROKER": self.url,
            "BULKHEAD_TEST_PREFIX": self.prefix,
            "BULKHEAD_TEST_DOWNSTREAM": self.downstream.url,
            "BULKHEAD_TEST_BREAKER": json.dumps(self.breaker),
            "BULKHEAD_TEST_STATE_URL": opts.get("state_url", RECORDS_URL),
            "BULKHEAD_TEST_WORKER_POOL": opts.get("worker_pool", "prefork"),
            "BULKHEAD_TEST_CONCURRENCY": str(opts.get("concurrency", CONCURRENCY)),
            "BULKHEAD_TEST_CAPPED": "1" if opts.get("capped", True) else "0",
            "BULKHEAD_TEST_METRICS_PORT": str(port),
            "BULKHEAD_TEST_RESULTS": "1" if opts.get("results") else "0",
            "BULKHEAD_TEST_PUBLISH_TIMEOUT": str(opts.get("publish_timeout", 10)),
            "BULKHEAD_TEST_TIME_LIMIT": str(opts.get("time_limit") or ""),
        }
        command = [
            sys.executable,
            *("-m", "celery", "-A", "tests.app.breaker_fleet", "bulkhead", "worker"),
            *("--pool", POOL, "--", "--hostname", f"{hostname}@%h", *WORKER_FLAGS),
        ]
        log_path = self.tmp / f"{hostname}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.workers.append(WorkerProcess(process, log_path))
        self.ports.append(port)
        return port

    def consuming(self, nodes: int) -> None:
        """Wait until ``nodes`` distinct nodes have run a ping (their consumers are up)."""

        def seen() -> bool:
            self.task("ping").delay(f"ping-{uuid.uuid4().hex[:6]}")
            time.sleep(0.3)
            pongs = [r for r in self.records.refresh() if r["event"] == "pong"]
            return len({r["node"] for r in pongs}) >= nodes

        for port in self.ports:
            wait_for(lambda port=port: _scrape(port), STARTUP, "a node's metrics endpoint")  # type: ignore[misc]
        wait_for(seen, STARTUP, f"{nodes} node(s) to consume", interval=0.0)

    def task(self, name: str) -> Any:
        return self.app.tasks[f"fleet.{name}"]

    def publish(self, tag: str, task: str = "call") -> str | None:
        """Publish one task: its id, or None when the breaker refused it at submit."""
        try:
            return str(self.task(task).delay(tag).id)
        except CircuitOpen:
            return None

    def refusal(self) -> CircuitOpen | None:
        """The CircuitOpen a publish raises now (its task is admitted otherwise)."""
        try:
            self.task("call").delay(f"probe-{uuid.uuid4().hex[:6]}")
        except CircuitOpen as exc:
            return exc
        return None

    def record(self) -> dict[str, str]:
        raw = self.state.hgetall(f"bulkhead:{{breaker:{self.name}}}:state")
        return {k.decode(): v.decode() for k, v in raw.items()}

    def scrape(self) -> list[Samples]:
        samples = [_scrape(port) for port in self.ports]
        assert all(s is not None for s in samples), "a metrics endpoint stopped answering"
        return samples  # type: ignore[return-value]

    def total(self, name: str, **labels: str) -> float:
        """``name`` summed over the nodes (a counter's ``_total`` sample)."""
        wanted = tuple(sorted({"breaker": self.name, **labels}.items()))
        return sum(s.get((name, wanted), 0.0) for s in self.scrape())

    def gauges(self) -> list[float | None]:
        key = ("celery_bulkhead_breaker_state", (("breaker", self.name),))
        return [s.get(key) for s in self.scrape()]

    def events(self, tag: str) -> list[str]:
        return [r["event"] for r in self.records.refresh() if r["tag"] == tag]

    def terminal(self, tags: list[str]) -> bool:
        ended = Counter(
            r["tag"] for r in self.records.refresh() if r["event"] in ("done", "failed")
        )
        return all(ended[tag] >= 1 for tag in tags)

    def transitions(self) -> dict[str, float]:
        name = "celery_bulkhead_breaker_transitions_total"
        return {s: self.total(name, state=s) for s in ("open", "half-open", "closed")}

    def close(self, dump_logs: bool) -> None:
        for worker in self.workers:
            worker.stop()
            if dump_logs:
                sys.stderr.write(f"\n--- {worker.log_path.name} ---\n{worker.log()[-6000:]}\n")
        with Connection(self.url) as conn:
            for queue in (self.queue, f"{self.queue}.continue", f"{self.prefix}.default"):
                with conn.channel() as channel, contextlib.suppress(conn.channel_errors):
                    channel.queue_delete(queue)
                if self.url.startswith("amqp"):
                    with conn.channel() as channel, contextlib.suppress(conn.channel_errors):
                        channel.exchange_delete(queue)
        # Key deletion, never a flush: on Redis (db 9) a queue_delete from a fresh
        # connection leaves the lists and bindings behind, so every key naming the
        # prefix goes (queues, bindings, records, results, the breaker's state).
        for client in (self.records.client, self.state):
            with contextlib.suppress(redis.RedisError):
                keys = list(client.scan_iter(match=f"*{self.prefix}*", count=1000))
                if keys:
                    client.delete(*keys)
        self.app.close()


@contextlib.contextmanager
def scenario(
    request: pytest.FixtureRequest,
    broker: str,
    tmp: Path,
    breaker: dict[str, Any] | None = None,
    **options: Any,
) -> Iterator[Scenario]:
    records_client = redis.Redis.from_url(RECORDS_URL)
    # A timeout: the cleanup must not hang on a state store a test froze.
    state = redis.Redis.from_url(options.get("state_url", RECORDS_URL), socket_timeout=2)
    downstream = Downstream()
    prefix = f"bhbrk{uuid.uuid4().hex[:8]}-{broker}"
    with Connection(BROKERS[broker]) as conn:
        conn.ensure_connection(max_retries=1)  # a missing broker fails here
    made = Scenario(
        broker,
        prefix,
        downstream,
        tmp,
        Records(records_client, f"{prefix}:log"),
        breaker or {},
        options,
        state,
    )
    failed_before = request.session.testsfailed
    try:
        yield made
    finally:
        made.close(dump_logs=request.session.testsfailed > failed_before)
        downstream.close()
        records_client.close()


# -- the fleet: two prefork nodes on each broker -----------------------------------------


@pytest.fixture(scope="module", params=sorted(BROKERS))
def fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    """Two nodes of 4 prefork processes each, sharing one breaker (state in Redis)."""
    tmp = tmp_path_factory.mktemp(f"fleet-{request.param}")
    with scenario(request, request.param, tmp) as fleet:
        for i in range(NODES):
            fleet.start(f"node{i}")
        fleet.consuming(NODES)
        yield fleet


def test_self_retry_in_a_guarded_task_is_not_a_failure(fleet: Scenario) -> None:
    """Six tasks retry themselves three times each (18 > fail_max): the breaker stays closed."""
    before = fleet.transitions()
    tags = [f"retry-{i}" for i in range(6)]
    for tag in tags:
        fleet.publish(tag, task="retrying")
    wait_for(lambda: all("done" in fleet.events(t) for t in tags), 30, "the retrying tasks")
    for tag in tags:
        assert fleet.events(tag) == ["retry", "retry", "retry", "done"]
    assert fleet.record() == {}  # no failure ever reached the store
    assert fleet.transitions() == before
    assert fleet.gauges() == [0.0] * NODES


def test_an_outage_opens_the_breaker_once_and_loses_no_task(fleet: Scenario) -> None:
    """The main scenario: fail, open once fleet-wide, trial, recover, run every deferred task.

    Calls reaching the dead downstream: at most fail_max + the tasks in flight
    (4 x 2) + the tasks started on a stale "closed" within cache_seconds (one
    per slot: a failing call outlasts cache_seconds) + one trial per reset.
    """
    settings = fleet.settings
    reset, fail_max = settings["reset_timeout"], settings["fail_max"]
    down = fleet.downstream
    before = fleet.transitions()
    deferred_before = fleet.total("celery_bulkhead_breaker_refusals_total", action="deferred")

    down.failing = True
    ids = {tag: fleet.publish(tag) for tag in (f"job-{i}" for i in range(48))}
    admitted = [tag for tag, task_id in ids.items() if task_id is not None]
    assert len(admitted) >= 40  # the breaker cannot have opened before most were published
    opened_at = wait_for(
        lambda: fleet.record().get("state") == "open" and time.monotonic(),
        20,
        "the breaker to open",
        interval=0.02,
    )

    # While open: a publish fails fast, saying when the next trial is due.
    refused = wait_for(fleet.refusal, 2 * settings["cache_seconds"] + 1, "a refusal at submit")
    assert (refused.pool, refused.breaker) == (POOL, fleet.name)
    assert 0 < refused.retry_after <= reset
    # Each node's gauge shows it open (2).
    wait_for(lambda: fleet.gauges() == [2.0] * NODES, 3, "both nodes' gauges at 2")

    time.sleep(max(0.0, opened_at + OUTAGE - time.monotonic()))
    down.failing = False
    recovered_at = time.monotonic()
    wait_for(lambda: fleet.terminal(admitted), 40, "every admitted task to end")

    # Each task ran exactly once: a failure during the outage, or one success after.
    for tag in admitted:
        assert fleet.events(tag) in (["failed"], ["done"]), (tag, fleet.events(tag))
        # The same task (its id), however many times it was deferred.
        assert [r["id"] for r in fleet.records.seen if r["tag"] == tag] == [ids[tag]]
    failed = [t for t in admitted if fleet.events(t) == ["failed"]]
    done = [t for t in admitted if fleet.events(t) == ["done"]]
    assert Counter(h.tag for h in down.successes() if h.tag in admitted) == Counter(done)
    assert sorted(h.tag for h in down.failures()) == sorted(failed)
    assert all(h.start >= recovered_at for h in down.successes() if h.tag in done)
    deferred = fleet.total("celery_bulkhead_breaker_refusals_total", action="deferred")
    assert deferred - deferred_before >= len(done) > 0  # each of them was deferred at least once

    # Calls to the dead downstream stay within the documented bound.
    trials_allowed = math.floor((recovered_at - opened_at) / reset) + 1
    in_flight = NODES * CONCURRENCY
    stale_starts = NODES * CONCURRENCY  # within cache_seconds, one per slot
    assert len(down.failures()) <= fail_max + in_flight + stale_starts + trials_allowed
    # Long after the opening only trials call it: one per reset_timeout, fleet-wide.
    trials = down.failures(since=opened_at + 1.0)
    assert len(trials) <= trials_allowed
    for first, second in itertools.pairwise(trials):
        assert second.start - first.start >= reset - 0.2

    # One opening from closed, fleet-wide; every other opening was a failed trial.
    moved = {s: v - before[s] for s, v in fleet.transitions().items()}
    assert moved["closed"] == 1
    assert moved["open"] == 1 + len(trials)
    assert moved["half-open"] == moved["open"]
    assert fleet.record()["state"] == "closed"
    wait_for(lambda: fleet.gauges() == [0.0] * NODES, 3, "both nodes' gauges back at 0")
    # Submit admits again.
    assert fleet.refusal() is None


def test_a_producers_clock_offset_changes_nothing(
    fleet: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A producer an hour ahead: same refusal, same retry_after, its tasks run at once."""
    reset = fleet.settings["reset_timeout"]
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    fleet.downstream.failing = True
    for i in range(fleet.settings["fail_max"]):
        fleet.publish(f"skew-fail-{i}")
    wait_for(lambda: fleet.record().get("state") == "open", 10, "the breaker to open")
    refused = wait_for(fleet.refusal, 2, "a refusal at submit")
    assert 0 < refused.retry_after <= reset
    fleet.downstream.failing = False
    wait_for(lambda: fleet.refusal() is None, 3 * reset + 2, "the breaker to admit again")
    wait_for(lambda: fleet.record().get("state") == "closed", 3 * reset + 2, "closed")
    published = time.monotonic()
    for i in range(4):
        assert fleet.publish(f"skew-ok-{i}")
    wait_for(
        lambda: all(fleet.events(f"skew-ok-{i}") == ["done"] for i in range(4)),
        10,
        "the skewed producer's tasks",
    )
    assert time.monotonic() - published < 5


def test_a_retry_is_never_refused_at_submit_but_new_work_is(fleet: Scenario) -> None:
    """A task running when the breaker opens: its own retry is admitted, a new task is not."""
    reset = fleet.settings["reset_timeout"]
    fleet.publish("in-flight", task="wait_then_retry")
    fleet.records.wait("waiting", "in-flight")
    fleet.downstream.failing = True
    for i in range(fleet.settings["fail_max"]):
        fleet.publish(f"opener-{i}")
    opened = wait_for(
        lambda: fleet.record().get("state") == "open" and time.time(), 10, "the breaker to open"
    )
    wait_for(fleet.refusal, 2, "a refusal at submit")
    time.sleep(fleet.settings["cache_seconds"])  # every node's view is "open" now
    fleet.records.client.set(f"{fleet.prefix}:go:in-flight", 1)
    fleet.records.wait("new-refused", "in-flight", timeout=10)
    fleet.downstream.failing = False
    (done,) = fleet.records.wait("done", "in-flight", timeout=4 * reset + 10)
    assert fleet.events("in-flight") == ["waiting", "new-refused", "done"]
    # The retry waited for the breaker like any task: it ran at the trial time or later.
    assert done["at"] >= opened + reset - 0.3


# -- single nodes -------------------------------------------------------------------------


def test_a_threads_pool_runs_guarded_calls_concurrently(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """8 calls of 1 s through one breaker on 8 threads take about 1 s, not 8 s."""
    with scenario(
        request, "redis", tmp_path, worker_pool="threads", concurrency=8, capped=False
    ) as node:
        node.start("threads")
        node.consuming(1)
        node.downstream.delay = 1.0
        tags = [f"slow-{i}" for i in range(8)]
        started = time.monotonic()
        for tag in tags:
            node.publish(tag)
        wait_for(lambda: node.terminal(tags), 20, "the slow calls")
        elapsed = time.monotonic() - started
        hits = node.downstream.successes()
        assert len(hits) == 8 and all(node.events(t) == ["done"] for t in tags)
        assert max(h.start for h in hits) - min(h.start for h in hits) < 0.8
        assert elapsed < 3.0, elapsed  # 1x the call time, with a generous margin


def test_on_open_fail_stores_circuit_open_as_the_failure(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    with scenario(
        request,
        "redis",
        tmp_path,
        breaker={"on_open": "fail", "reset_timeout": 30, "fail_fast_at_submit": False},
        worker_pool="threads",
        concurrency=2,
        results=True,
    ) as node:
        node.start("fail")
        node.consuming(1)
        node.downstream.failing = True
        for i in range(3):
            node.publish(f"break-{i}")
        wait_for(lambda: node.record().get("state") == "open", 10, "the breaker to open")
        calls = len(node.downstream.hits)
        result = node.task("call").delay("refused")
        with pytest.raises(CircuitOpen) as info:
            result.get(timeout=10)
        assert (info.value.pool, info.value.breaker) == (POOL, node.name)
        assert 0 < info.value.retry_after <= 30
        assert result.state == "FAILURE"
        assert len(node.downstream.hits) == calls  # it never ran
        assert node.events("refused") == []
        assert node.total("celery_bulkhead_breaker_refusals_total", action="failed") == 1
        assert node.total("celery_bulkhead_breaker_refusals_total", action="deferred") == 0


def _consumed(node: Scenario) -> set[str]:
    """The queues the scenario's nodes consume now (``celery inspect active_queues``)."""
    replies = node.app.control.inspect(timeout=2).active_queues() or {}
    return {queue["name"] for queues in replies.values() for queue in queues}


@pytest.mark.parametrize("capped", [False, True], ids=["uncapped", "capped"])
def test_on_open_pause_stops_consuming_until_the_next_trial(
    request: pytest.FixtureRequest, tmp_path: Path, capped: bool
) -> None:
    """While open the queue grows in the broker (nothing bounces); then every task runs once.

    A capped pool's continuation queue (where the task in hand is deferred to) is
    not consumed either while paused.
    """
    reset = 4.0
    with scenario(
        request,
        "redis",
        tmp_path,
        breaker={"on_open": "pause", "reset_timeout": reset, "fail_fast_at_submit": False},
        worker_pool="threads",
        concurrency=2,
        capped=capped,
    ) as node:
        pool_queues = {node.queue, f"{node.queue}.continue"} if capped else {node.queue}
        node.start("pause")
        node.consuming(1)
        node.downstream.failing = True
        for i in range(3):
            node.publish(f"break-{i}")
        opened_at = wait_for(
            lambda: node.record().get("state") == "open" and time.monotonic(), 10, "open"
        )
        node.publish("first")  # met by the open breaker: deferred, and the node pauses
        wait_for(
            lambda: node.total("celery_bulkhead_breaker_refusals_total", action="deferred") >= 1,
            5,
            "the first refusal",
        )
        tags = [f"held-{i}" for i in range(10)]
        for tag in tags:
            node.publish(tag)
        assert not _consumed(node) & pool_queues  # paused: none of the pool's queues
        time.sleep(1.0)
        paused = Connection(node.url)
        with paused as conn, conn.channel() as channel:
            depth = channel.queue_declare(queue=node.queue, passive=True).message_count
        assert depth >= len(tags)  # waiting in the broker, not bouncing through the node
        assert node.total("celery_bulkhead_breaker_refusals_total", action="deferred") <= 3
        assert len(node.downstream.hits) == 3  # nothing called while paused
        node.downstream.failing = False
        everything = [*tags, "first"]
        wait_for(lambda: node.terminal(everything), 4 * reset + 10, "every held task")
        assert all(node.events(t) == ["done"] for t in everything)
        assert min(h.start for h in node.downstream.successes()) >= opened_at + reset - 0.1
        assert "not consuming" in node.workers[0].log()
        assert _consumed(node) >= pool_queues  # resumed: all of them again


def _start_redis(port: int, tmp: Path) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [
            "redis-server",
            *("--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"),
            *("--dir", str(tmp)),
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)

    def pings() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    wait_for(pings, 10, "the private redis-server")
    client.close()
    return server


@pytest.fixture
def state_redis(tmp_path: Path) -> Iterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    """A redis-server of the test's own for breaker state, to freeze and kill."""
    port = _free_port()
    servers = [_start_redis(port, tmp_path)]
    yield port, servers
    for server in servers:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGCONT)
            server.kill()
        server.wait(timeout=10)


PUBLISH_TIMEOUT = 1.0


def test_a_frozen_state_store_falls_back_to_closed_within_the_deadline(
    request: pytest.FixtureRequest, tmp_path: Path, state_redis: tuple[int, Any]
) -> None:
    """on_state_error="closed": tasks run, each look at the frozen store costing the deadline."""
    port, servers = state_redis
    with scenario(
        request,
        "redis",
        tmp_path,
        breaker={"fail_fast_at_submit": False},
        state_url=f"redis://127.0.0.1:{port}/0",
        worker_pool="threads",
        concurrency=2,
        publish_timeout=PUBLISH_TIMEOUT,
    ) as node:
        node.start("closed")
        node.consuming(1)
        os.kill(servers[0].pid, signal.SIGSTOP)
        for i in range(3):
            published = time.monotonic()
            node.publish(f"frozen-{i}")
            wait_for(lambda i=i: node.events(f"frozen-{i}") == ["done"], 10, "a task")  # type: ignore[misc]
            assert time.monotonic() - published < PUBLISH_TIMEOUT + 1.5
            time.sleep(0.3)  # past cache_seconds: the next task looks at the store again
        assert "acting as closed" in node.workers[0].log()
        os.kill(servers[0].pid, signal.SIGCONT)  # for a quick cleanup


def test_a_stopped_state_store_falls_back_to_open_when_asked(
    request: pytest.FixtureRequest, tmp_path: Path, state_redis: tuple[int, Any]
) -> None:
    """on_state_error="open": while the store is down nothing runs; after, everything does."""
    port, servers = state_redis
    with scenario(
        request,
        "redis",
        tmp_path,
        breaker={"on_state_error": "open", "fail_fast_at_submit": False},
        state_url=f"redis://127.0.0.1:{port}/0",
        worker_pool="threads",
        concurrency=2,
        publish_timeout=PUBLISH_TIMEOUT,
    ) as node:
        node.start("open")
        node.consuming(1)
        servers[0].kill()
        servers[0].wait(timeout=10)
        time.sleep(0.3)  # past cache_seconds
        tags = [f"held-{i}" for i in range(3)]
        for tag in tags:
            node.publish(tag)
        wait_for(
            lambda: node.total("celery_bulkhead_breaker_refusals_total", action="deferred") >= 3,
            PUBLISH_TIMEOUT + 3,
            "the tasks to be deferred",
        )
        time.sleep(1.0)
        assert node.downstream.hits == []
        assert "acting as open" in node.workers[0].log()
        servers.append(_start_redis(port, tmp_path))
        wait_for(lambda: node.terminal(tags), 15, "the held tasks after the store is back")
        assert all(node.events(t) == ["done"] for t in tags)


def test_a_task_killed_at_its_hard_time_limit_is_a_failure(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A downstream that hangs: each task is killed at the pool's time_limit and counted."""
    with scenario(
        request,
        "redis",
        tmp_path,
        breaker={"reset_timeout": 30, "fail_fast_at_submit": False},
        concurrency=2,
        time_limit=1,
    ) as node:
        node.start("limit")
        node.consuming(1)
        node.downstream.hang = 5.0
        for i in range(3):
            node.publish(f"hung-{i}")
        wait_for(lambda: node.record().get("state") == "open", 15, "the breaker to open")
        assert node.transitions()["open"] == 1


@pytest.mark.parametrize("on_state_error", ["closed", "open"])
def test_a_producer_meets_a_frozen_state_store_within_the_deadline(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    state_redis: tuple[int, Any],
    on_state_error: str,
) -> None:
    """fail_fast_at_submit with the state store frozen: each publish decides within the deadline."""
    port, servers = state_redis
    with scenario(
        request,
        "redis",
        tmp_path,
        breaker={"on_state_error": on_state_error},
        state_url=f"redis://127.0.0.1:{port}/0",
        publish_timeout=PUBLISH_TIMEOUT,
    ) as producer:
        producer.publish("warm-up")  # the state store answered once
        os.kill(servers[0].pid, signal.SIGSTOP)
        for i in range(3):
            time.sleep(0.3)  # past cache_seconds: this publish looks at the store again
            started = time.monotonic()
            admitted = producer.publish(f"frozen-{i}") is not None
            assert time.monotonic() - started < PUBLISH_TIMEOUT + 0.5
            assert admitted is (on_state_error == "closed")
        os.kill(servers[0].pid, signal.SIGCONT)  # for a quick cleanup


# -- the rate rules ----------------------------------------------------------------------


def test_a_downstream_failing_half_its_calls_opens_the_breaker_by_rate(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Every other call fails; fail_max (1,000) is far away: the failure rate opens it."""
    minimum = 20
    with scenario(
        request,
        "redis",
        tmp_path,
        breaker={
            "fail_max": 1_000,
            "failure_rate_threshold": 40,
            "minimum_calls": minimum,
            "reset_timeout": 30,
            "fail_fast_at_submit": False,
        },
        worker_pool="threads",
        concurrency=4,
    ) as node:
        node.start("rate")
        node.consuming(1)
        down = node.downstream
        down.fail_every = 2
        tags = [f"half-{i}" for i in range(80)]
        for tag in tags:
            node.publish(tag)
        wait_for(lambda: node.record().get("state") == "open", 30, "the breaker to open")
        calls_at_opening = len(down.hits)
        pings = [r for r in node.records.refresh() if r["event"] == "pong"]  # calls too
        # Not before minimum_calls calls (the pings that found the node count among them).
        assert minimum <= calls_at_opening + len(pings) and calls_at_opening < len(tags)
        failures = len(down.failures())
        assert failures < 1_000  # not fail_max's doing
        assert failures >= 0.4 * calls_at_opening - 1  # what a 50 % downstream gives
        assert node.transitions()["open"] == 1
        # While it is open the downstream is spared: what was let through before, and no more.
        wait_for(lambda: node.gauges() == [2.0], 5, "the node's gauge at 2")
        hits = len(down.hits)
        deferred = "celery_bulkhead_breaker_refusals_total"
        wait_for(lambda: node.total(deferred, action="deferred") >= 1, 10, "a deferral")
        assert len(down.hits) <= hits + 4  # at most the calls already running


def test_slow_calls_that_succeed_open_the_breaker_by_slow_call_rate(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Every call answers 200 after 0.5 s; slow_call_duration 0.3 s: the slow-call rate opens it.

    Prefork: each call's duration is timed in the node's main process.
    """
    with scenario(
        request,
        "redis",
        tmp_path,
        breaker={
            "fail_max": 1_000,
            "slow_call_duration": 0.3,
            "slow_call_rate_threshold": 80,
            "minimum_calls": 8,
            "reset_timeout": 30,
            "fail_fast_at_submit": False,
        },
        concurrency=4,
    ) as node:
        node.start("slow")
        node.consuming(1)
        down = node.downstream
        down.delay = 0.5
        tags = [f"slow-{i}" for i in range(40)]
        for tag in tags:
            node.publish(tag)
        wait_for(lambda: node.record().get("state") == "open", 30, "the breaker to open")
        assert down.failures() == []  # every call succeeded
        pings = [r for r in node.records.refresh() if r["event"] == "pong"]  # calls too
        assert len(down.hits) + len(pings) >= 8 and len(down.hits) < len(tags)
        assert all(node.events(t) in ([], ["done"]) for t in tags)
        assert node.transitions()["open"] == 1


def _script_calls(client: redis.Redis) -> int:
    """Script calls (every breaker operation is one) the server has run since CONFIG RESETSTAT."""
    stats = client.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval")
    )


def test_successes_through_a_rate_window_cost_no_redis_call_per_task(
    request: pytest.FixtureRequest, tmp_path: Path, state_redis: tuple[int, Any]
) -> None:
    """400 successful tasks through a closed breaker with both rate rules on.

    The breaker's state lives on a redis-server of the test's own, so every
    script call it serves is the breaker's.  The node's main process counts
    the calls in memory and reports them with its cache refresh: at most one
    call per ``cache_seconds`` (0.2 s) while tasks run, not one per task.
    """
    port, _ = state_redis
    cache = DEFAULTS["cache_seconds"]
    tasks = 400
    with scenario(
        request,
        "redis",
        tmp_path,
        breaker={
            "fail_max": 1_000,
            "failure_rate_threshold": 50,
            "slow_call_duration": 5,
            "minimum_calls": 10,
            "fail_fast_at_submit": False,  # the producer looks at nothing
        },
        state_url=f"redis://127.0.0.1:{port}/0",
        worker_pool="threads",
        concurrency=8,
    ) as node:
        node.start("cost")
        node.consuming(1)
        stats = redis.Redis(port=port)
        stats.config_resetstat()
        started = time.monotonic()
        tags = [f"ok-{i}" for i in range(tasks)]
        for tag in tags:
            node.publish(tag)
        wait_for(lambda: node.terminal(tags), 60, "every task", interval=0.05)
        elapsed = time.monotonic() - started
        during = _script_calls(stats)
        # The last interval's calls reach Redis with the next refresh: a ping after it.
        record = f"bulkhead:{{breaker:{node.name}}}:state"

        def counted() -> int:
            node.publish(f"flush-{uuid.uuid4().hex[:6]}", task="ping")
            raw = stats.hgetall(record)
            return sum(int(v) for k, v in raw.items() if k.endswith(b":c"))

        reported = wait_for(lambda: (n := counted()) >= tasks and n, 10, "the counts", 0.3)
        stats.close()
        assert all(node.events(t) == ["done"] for t in tags)
        assert node.record().get("state") in (None, "closed")
        sys.stderr.write(
            f"\n{tasks} tasks in {elapsed:.2f}s: {during} breaker script calls "
            f"(cache_seconds {cache}); {reported} calls counted in Redis\n"
        )
        assert during <= elapsed / cache + 3, (during, elapsed)
        assert during <= tasks / 10, during
