"""Tenant limits at the worker, on real ``celery bulkhead worker`` processes.

A worker checks a task's tenant in its main process just before the task
starts.  These tests try to break what docs/tenants.md promises there:

* a task over its tenant's rate is published again and acknowledged, never
  lost, never run twice, not a retry, not a failure, and runs spaced at the
  rate (Redis broker; RabbitMQ broker with the state in Redis);
* a quiet tenant beside a flooding one is not delayed by the flood;
* ``max_inflight`` holds under prefork, and other tenants run meanwhile;
* a prefork node keeps running tasks after more deferrals than processes
  (each deferred task gives its pool slot back);
* a task pushed back ``max_deferrals`` times runs anyway;
* a task stopped by its hard time limit gives its slot back at once;
* the slots of tasks killed with ``kill -9`` come back when their leases
  expire (``time_limit`` + 60 s): that scenario starts first, so its wait
  overlaps the other tests;
* without a time limit, a running task's lease is renewed: a task that
  outlives several lease lengths keeps its slot.

Tenants are named per run (``<name>-<uuid>``), so runs sharing a Redis never
share a bucket or a lease set; every key a test made is deleted at the end.
"""

from __future__ import annotations

import contextlib
import itertools
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
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection
from prometheus_client.parser import text_string_to_metric_families

from celery_bulkhead.bulkhead import installed_on
from celery_bulkhead.depth import queue_depth
from celery_bulkhead.routing import consumed_queues
from celery_bulkhead.tenants import bucket_key, lease_key
from celery_bulkhead.worker.request import OUTCOMES
from tests.app.tenants import CRASH_TIME_LIMIT, POOLS, make_tenants_app
from tests.e2e.conftest import BROKERS, Env, Records, WorkerProcess, wait_for

MODULE = "tests.app.tenants"
#: Scheduling noise on a busy 2-core machine: a timer firing late, a record's RPUSH.
SLACK = 0.05


# -- helpers ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            return [int(child) for child in listing.read().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Node:
    """One supervised pool worker (``celery bulkhead worker --pool NAME``) and its metrics."""

    env: Env
    pool: str
    process: WorkerProcess
    port: int

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        found = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return found

    def counters(self) -> dict[str, float]:
        """Tasks by outcome and tasks throttled at the worker, as this node counts them."""
        samples = self.samples()
        pool = (("pool", self.pool),)
        counts = {
            outcome: samples.get(
                ("celery_bulkhead_tasks_total", (("outcome", outcome), *pool)), 0.0
            )
            for outcome in OUTCOMES
        }
        counts["throttled"] = samples.get(
            ("celery_bulkhead_tenant_throttled_total", (*pool, ("side", "worker"))), 0.0
        )
        return counts

    def child(self) -> int | None:
        """The pid of the ``celery worker`` the supervisor runs (its own process group)."""
        children = _children(self.process.process.pid)
        return children[0] if children else None


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


@dataclass
class Stage:
    """One broker and prefix: the app, the records, the nodes and the tenants a test used."""

    env: Env
    tenants: set[str] = field(default_factory=set)

    @property
    def app(self) -> Any:
        return self.env.app

    @property
    def records(self) -> Records:
        return self.env.records

    def tenant(self, name: str) -> str:
        tenant = f"{name}-{uuid.uuid4().hex[:8]}"
        self.tenants.add(tenant)
        return tenant

    def key(self, name: str) -> str:
        return self.env.key(name)

    def start(self, pool: str, **env: str) -> Node:
        """A supervised node for ``pool`` with its metrics on a free port, not yet known ready."""
        port = _free_port()
        process = self.env.start(
            "--pool",
            pool,
            extra_env={"BULKHEAD_TEST_METRICS_PORT": str(port - POOLS.index(pool)), **env},
        )
        return Node(self.env, pool, process, port)

    def ready(self, node: Node, send: Any, timeout: float = 60) -> None:
        """Wait until ``node`` has run a warm-up task (sent by ``send(tag)``) and serves metrics."""
        tag = f"warm-up-{uuid.uuid4().hex[:6]}"
        send(tag)
        self.records.wait("done", tag, timeout=timeout)
        wait_for(lambda: _serves(node), 30, "the metrics endpoint")

    def runs(self, tag_prefix: str, event: str = "done") -> list[dict[str, Any]]:
        return [
            r
            for r in self.records.refresh()
            if r["event"] == event and str(r.get("tag", "")).startswith(tag_prefix)
        ]

    def queues(self) -> list[str]:
        bulkhead = installed_on(self.app)
        return [name for pool in bulkhead.pools for name in consumed_queues(pool)]

    def cleanup(self) -> None:
        running = [w for w in self.env.workers if w.process.poll() is None]
        for worker in running:  # all drain at once
            worker.signal(signal.SIGTERM)
        for worker in running:
            _drained(worker)
        url = self.env.url
        queues = [*self.queues(), f"{self.env.prefix}.default"]
        client = redis.Redis.from_url(BROKERS["redis"])
        if self.env.broker == "rabbitmq":
            with Connection(url) as conn:
                for name in queues:
                    for delete in ("queue_delete", "exchange_delete"):
                        with conn.channel() as channel, contextlib.suppress(*conn.channel_errors):
                            getattr(channel, delete)(name)
        # On Redis every kombu key carries the prefix (tests/app/tenants.py), as do the records.
        keys = [
            *client.scan_iter(match=f"{self.env.prefix}*", count=1000),
            *(
                make(pool, tenant)
                for pool in POOLS
                for tenant in self.tenants
                for make in (bucket_key, lease_key)
            ),
        ]
        if keys:
            client.delete(*keys)
        client.close()


def _serves(node: Node) -> bool:
    try:
        node.samples()
    except OSError:
        return False
    return True


def stop_gracefully(worker: WorkerProcess) -> None:
    """SIGTERM: the supervisor drains its worker (kombu hands held messages back), then exits."""
    if worker.process.poll() is None:
        worker.signal(signal.SIGTERM)
        _drained(worker)


def _drained(worker: WorkerProcess) -> None:
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        worker.stop()  # SIGQUIT: the supervisor's hard stop


def _stage(
    request: pytest.FixtureRequest,
    broker: str,
    session_prefix: str,
    records_client: redis.Redis,
    tmp: Path,
) -> Iterator[Stage]:
    url = BROKERS[broker]
    with Connection(url) as conn:
        conn.ensure_connection(max_retries=1)  # a missing broker fails here, loudly
    prefix = f"{session_prefix}-tw-{broker}-{uuid.uuid4().hex[:6]}"
    app = make_tenants_app(url, prefix)
    records = Records(records_client, f"{prefix}:log")
    stage = Stage(Env(broker, url, prefix, app, records, tmp, MODULE))
    failed = request.session.testsfailed
    try:
        yield stage
    finally:
        if request.session.testsfailed > failed:
            for i, worker in enumerate(stage.env.workers):
                sys.stderr.write(f"\n--- {broker} worker {i} log ---\n{worker.log()[-6000:]}\n")
        stage.cleanup()


@pytest.fixture(scope="module")
def on_redis(
    request: pytest.FixtureRequest,
    session_prefix: str,
    records_client: redis.Redis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stage]:
    """The tenants app on a Redis broker whose Redis also holds the tenant state."""
    tmp = tmp_path_factory.mktemp("redis")
    yield from _stage(request, "redis", session_prefix, records_client, tmp)


@pytest.fixture(scope="module")
def on_rabbitmq(
    request: pytest.FixtureRequest,
    session_prefix: str,
    records_client: redis.Redis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stage]:
    """The tenants app on RabbitMQ, its tenant state in Redis."""
    tmp = tmp_path_factory.mktemp("rabbitmq")
    yield from _stage(request, "rabbitmq", session_prefix, records_client, tmp)


# -- kill -9: started first, so the leases' minute runs while the other tests do ----------------


@dataclass
class Crash:
    """What the kill -9 scenario saw: the dead tasks' leases and what was sent after."""

    killed_at: float
    expiries: list[float]  # when the dead tasks' leases expire (epoch seconds, Redis time)
    dead: set[str]
    tenant: str
    other: str
    node: Node
    first_pid: int
    sent: dict[str, float] = field(default_factory=dict)  # task id -> time sent


@pytest.fixture(scope="module")
def crashed(on_redis: Stage) -> Crash:
    """Two tasks of a tenant with max_inflight=2 hold both slots; their node is killed -9.

    The supervisor starts a new node; then three more of the tenant's tasks are
    sent, and two of another tenant's.
    """
    stage = on_redis
    node = stage.start("crash")
    task = stage.app.tasks["tenants.crash"]
    stage.ready(
        node,
        lambda tag: task.apply_async((tag,), headers={"X-Tenant": stage.tenant("warm")}),
    )
    tenant, other = stage.tenant("crashed"), stage.tenant("bystander")
    release = stage.key("never")  # nothing is ever pushed: the holders block until killed
    dead = {
        task.apply_async((f"dead-{i}", release, 2.5), headers={"X-Tenant": tenant}).id
        for i in range(2)
    }
    # Both hold their leases (the hard time limit is CRASH_TIME_LIMIT: kill before it).
    wait_for(lambda: len(stage.runs("dead-", "started")) == 2, 10, "both holders to start", 0.01)
    first_pid = node.child()
    assert first_pid is not None
    os.killpg(first_pid, signal.SIGKILL)
    killed_at = time.time()
    wait_for(lambda: not _alive(first_pid), 10, "the killed node to be gone", 0.01)
    client = stage.records.client
    leases = client.zrange(lease_key("crash", tenant), 0, -1, withscores=True)
    assert {member.decode() for member, _ in leases} == dead, "a killed task's lease went away"
    expiries = sorted(score / 1000 for _, score in leases)
    assert all(
        killed_at + 50 < expiry <= killed_at + CRASH_TIME_LIMIT + 60 + SLACK for expiry in expiries
    )
    wait_for(lambda: node.child() not in (None, first_pid), 20, "the supervisor to restart it")
    wait_for(lambda: _serves(node), 30, "the new node's metrics endpoint")
    crash = Crash(killed_at, expiries, dead, tenant, other, node, first_pid)
    for i in range(3):
        sent = task.apply_async((f"after-{i}",), headers={"X-Tenant": tenant})
        crash.sent[sent.id] = time.time()
    for i in range(2):
        sent = task.apply_async((f"bystander-{i}",), headers={"X-Tenant": other})
        crash.sent[sent.id] = time.time()
    return crash


@pytest.fixture(scope="module", autouse=True)
def _start_the_kill_9_clock_first(request: pytest.FixtureRequest) -> None:
    """When the kill -9 test is selected, its scenario starts before every other test."""
    if any(item.name.startswith("test_slots_of_killed_tasks") for item in request.session.items):
        request.getfixturevalue("crashed")


# -- rate at the worker: deferred, spaced, exactly once -----------------------------------------

PACED_RATE = 5.0
PACED_TASKS = 30


@pytest.fixture(scope="module", params=sorted(BROKERS))
def paced(request: pytest.FixtureRequest) -> tuple[Stage, Node]:
    stage: Stage = request.getfixturevalue(f"on_{request.param}")
    node = stage.start("paced")
    task = stage.app.tasks["tenants.paced"]
    stage.ready(node, lambda tag: task.delay(tenant=stage.tenant("warm"), tag=tag))
    return stage, node


def test_worker_deferral_runs_every_task_once_spaced_at_the_rate(
    paced: tuple[Stage, Node],
) -> None:
    """30 tasks of one tenant at 5/s burst 1: all run, once each, no faster than the rate."""
    stage, node = paced
    tenant = stage.tenant("paced")
    task = stage.app.tasks["tenants.paced"]
    before = node.counters()
    sent = [task.delay(tenant=tenant, tag=f"paced-{tenant}-{i}").id for i in range(PACED_TASKS)]
    wait_for(
        lambda: (found := stage.runs(f"paced-{tenant}-")) and len(found) >= PACED_TASKS and found,
        PACED_TASKS / PACED_RATE + 20,
        f"{PACED_TASKS} paced tasks to run",
    )
    time.sleep(1.0)  # a duplicate run would show up now (deferrals are due within the second)
    done = stage.runs(f"paced-{tenant}-")
    runs = Counter(r["id"] for r in done)
    lost, twice = set(sent) - set(runs), {i: n for i, n in runs.items() if n > 1}
    assert not lost and not twice, f"lost {lost}, run more than once {twice}"

    # Spacing.  Every deferred task had its slot reserved at first + k/rate; it
    # runs no earlier than its slot and no later than slot + jitter (at most
    # 0.1 x wait + 0.05 s).  So the k-th run is no earlier than k intervals after
    # the first, and runs i < j are at least (j - i) intervals apart less the
    # jitter of slot i.
    interval = 1 / PACED_RATE
    at = sorted(r["at"] for r in done)
    for k, when in enumerate(at):
        assert when - at[0] >= k * interval - SLACK, f"run {k} came {when - at[0]:.3f}s in"
    for i, j in itertools.combinations(range(len(at)), 2):
        jitter = min(1.0, 0.1 * i * interval + 0.05)
        assert at[j] - at[i] >= (j - i) * interval - jitter - SLACK, (i, j, at[j] - at[i])
    total = at[-1] - at[0]
    last = (PACED_TASKS - 1) * interval
    assert last - SLACK <= total <= last + min(1.0, 0.1 * last + 0.05) + 0.5, total
    # Deferred once each (the reserved slot runs without a second check): 29 deferrals.
    assert sum(1 for r in done if r["deferrals"]) == PACED_TASKS - 1
    assert {r["deferrals"] for r in done} == {None, 1}

    # Not retried, not failed: the node counts 30 successes and 29 deferrals.
    counted = wait_for(
        lambda: (d := _delta(node.counters(), before))["succeeded"] >= PACED_TASKS and d,
        10,
        "the successes to be counted",
    )
    assert counted == {
        **dict.fromkeys(OUTCOMES, 0.0),
        "succeeded": PACED_TASKS,
        "throttled": PACED_TASKS - 1,
    }
    # Nothing left to come back: no message of ours waits or is held unacknowledged.
    with stage.app.connection_for_read() as conn:
        for queue in consumed_queues(installed_on(stage.app).pool("paced")):
            assert queue_depth(conn, queue) == 0, queue
    if stage.env.broker == "redis":
        unacked = f"{stage.env.prefix}:unacked"
        held = [p for _, p in stage.records.client.hscan_iter(unacked) if tenant.encode() in p]
        assert held == []


# -- a quiet tenant beside a flood --------------------------------------------------------------

FLOOD_RATE, FLOOD_BURST = 2.5, 2  # the flooded pool's limit per tenant
#: 50/s: each deferral costs the node's main process ~3 ms of CPU (receive, check,
#: publish again, ack, receive the deferred copy): a flood well within what one
#: node defers on a busy 2-core machine.  A flood beyond it backs up the queue
#: for every tenant (then enforce="both" stops it at the producer).
FLOOD_FACTOR = 20
FLOOD_SECONDS = 4.0
QUIET_EVERY = 0.5  # 2/s: under the quiet tenant's own 2.5/s, burst 2
QUIET_BOUND = 1.0  # seconds from publish to run


def test_a_quiet_tenant_is_not_delayed_by_a_flooding_one(on_redis: Stage) -> None:
    """One tenant floods at 20x its rate; a quiet tenant's tasks still start within 1 s."""
    stage = on_redis
    node = stage.start("flooded")
    try:
        task = stage.app.tasks["tenants.flooded"]
        stage.ready(node, lambda tag: task.delay(tenant=stage.tenant("warm"), tag=tag))
        flood, quiet = stage.tenant("flood"), stage.tenant("quiet")
        before = node.counters()
        flooder_app = make_tenants_app(stage.env.url, stage.env.prefix)
        flooder = flooder_app.tasks["tenants.flooded"]
        stop = threading.Event()
        flooded: list[float] = []

        def flood_it() -> None:
            every = 1 / (FLOOD_RATE * FLOOD_FACTOR)
            start = time.monotonic()
            n = 0
            while not stop.is_set():
                due = start + n * every
                if (ahead := due - time.monotonic()) > 0:
                    time.sleep(ahead)  # pacing the flood, not waiting on a condition
                flooder.delay(tenant=flood, tag=f"flood-{n}")
                flooded.append(time.time())
                n += 1

        thread = threading.Thread(target=flood_it, daemon=True)
        thread.start()
        sent: dict[str, float] = {}
        try:
            time.sleep(0.5)  # the flood is under way before the quiet tenant speaks
            until = time.monotonic() + FLOOD_SECONDS
            n = 0
            while time.monotonic() < until:
                sent[f"quiet-{quiet}-{n}"] = time.time()
                task.delay(tenant=quiet, tag=f"quiet-{quiet}-{n}")
                n += 1
                time.sleep(QUIET_EVERY)  # pacing the quiet tenant
        finally:
            stop.set()
            thread.join(10)
        flood_started, flood_ended = flooded[0], flooded[-1]
        assert len(flooded) >= 0.8 * FLOOD_RATE * FLOOD_FACTOR * (FLOOD_SECONDS + 0.5)
        runs = wait_for(
            lambda: (found := stage.runs(f"quiet-{quiet}-")) and len(found) >= len(sent) and found,
            20,
            "every quiet task to run",
        )
        late = {r["tag"]: round(r["at"] - sent[r["tag"]], 3) for r in runs}
        assert max(late.values()) <= QUIET_BOUND, late
        assert len(runs) == len(sent)
        # The flood was throttled at the worker: its runs during the flood kept to
        # burst + rate x time (each run is no earlier than its slot).
        flood_runs = [
            r["at"] for r in stage.runs("flood-") if r["tenant"] == flood and r["at"] <= flood_ended
        ]
        allowed = FLOOD_BURST + FLOOD_RATE * (flood_ended - flood_started) + 1
        assert len(flood_runs) <= allowed, (len(flood_runs), allowed)
        counted = _delta(node.counters(), before)
        assert counted["throttled"] > 0.5 * len(flooded), counted
        assert counted["failed"] == counted["retried"] == 0
        flooder_app.close()
    finally:
        stop_gracefully(node.process)


# -- max_inflight under prefork -----------------------------------------------------------------


@pytest.fixture(scope="module")
def inflight(on_redis: Stage) -> Node:
    stage = on_redis
    node = stage.start("inflight")
    task = stage.app.tasks["tenants.hold"]
    stage.ready(node, lambda tag: task.apply_async((tag,), headers={"X-Tenant": "warm-up"}))
    stage.tenants.add("warm-up")
    return node


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, step in events:  # at a tie an end (-1) sorts first: touching spans do not overlap
        running += step
        most = max(most, running)
    return most


def _spans(stage: Stage, prefix: str) -> dict[str, tuple[float, float]]:
    started = {r["id"]: r["at"] for r in stage.runs(prefix, "started")}
    done = {r["id"]: r["at"] for r in stage.runs(prefix, "done")}
    return {task_id: (started[task_id], done[task_id]) for task_id in done}


def test_max_inflight_holds_under_prefork_and_other_tenants_run_meanwhile(
    on_redis: Stage, inflight: Node
) -> None:
    """12 blocking tasks of A at max_inflight=2, concurrency 4: never more than 2 at once."""
    stage, node = on_redis, inflight
    task = stage.app.tasks["tenants.hold"]
    a, b = stage.tenant("a"), stage.tenant("b")
    release = stage.key("release-a")
    before = node.counters()
    sent_a = [
        task.apply_async((f"a-{a}-{i}", release, 30.0), headers={"X-Tenant": a}).id
        for i in range(12)
    ]
    wait_for(lambda: len(stage.runs(f"a-{a}-", "started")) >= 2, 30, "two of A's tasks to start")
    # A holds both its slots: the rest of A is pushed back, B runs beside it.
    b_sent = time.time()
    sent_b = [task.apply_async((f"b-{b}-{i}",), headers={"X-Tenant": b}).id for i in range(4)]
    b_runs = wait_for(
        lambda: (found := stage.runs(f"b-{b}-")) and len(found) >= 4 and found,
        10,
        "B's tasks to run while A holds its slots",
    )
    assert {r["id"] for r in b_runs} == set(sent_b)
    assert max(r["at"] for r in b_runs) - b_sent < 3.0
    wait_for(lambda: _delta(node.counters(), before)["throttled"] >= 10, 10, "A to be deferred")
    assert len(stage.runs(f"a-{a}-", "started")) == 2, "a third task of A started"
    # Let A's tasks end one at a time: each release lets exactly one more start.
    for n in range(1, 13):
        stage.env.release(release)
        wait_for(lambda n=n: len(stage.runs(f"a-{a}-")) >= n, 40, f"{n} of A's tasks to end")
        time.sleep(0.2)  # each now holds its slot for a moment: overlaps would show
    spans = _spans(stage, f"a-{a}-")
    assert sorted(spans) == sorted(sent_a)
    assert len(stage.runs(f"a-{a}-", "started")) == 12, "a task of A started twice"
    assert _most_at_once(list(spans.values())) == 2
    # Ten waited for a slot (deferred, then run), and none was retried or failed.
    waited = [r for r in stage.runs(f"a-{a}-", "started") if r["deferrals"]]
    assert len(waited) == 10
    counted = wait_for(
        lambda: (d := _delta(node.counters(), before))["succeeded"] >= 16 and d,
        10,
        "the successes to be counted",
    )
    assert counted["succeeded"] == 16
    assert counted["failed"] == counted["retried"] == counted["timed_out"] == 0
    assert counted["throttled"] >= sum(r["deferrals"] for r in waited)
    assert stage.records.client.zcard(lease_key("inflight", a)) == 0, "a lease was not released"


def test_a_prefork_node_keeps_running_after_more_deferrals_than_processes(
    on_redis: Stage, inflight: Node
) -> None:
    """Each deferred task gives its pool slot back: 2 held + 10 deferrals, then 8 others run."""
    stage, node = on_redis, inflight
    task = stage.app.tasks["tenants.hold"]
    held, others = stage.tenant("holder"), stage.tenant("others")
    release = stage.key("release-holder")
    before = node.counters()
    for i in range(6):
        task.apply_async((f"holder-{held}-{i}", release, 30.0), headers={"X-Tenant": held})
    # 2 of concurrency 4 hold; 4 are pushed back again and again: more deferrals than slots.
    wait_for(
        lambda: _delta(node.counters(), before)["throttled"] >= 10,
        20,
        "10 deferrals (over 2x concurrency)",
    )
    sent = time.time()
    for i in range(8):
        task.apply_async((f"other-{others}-{i}",), headers={"X-Tenant": others})
    runs = wait_for(
        lambda: (found := stage.runs(f"other-{others}-")) and len(found) >= 8 and found,
        15,
        "8 tasks of another tenant to run on the 2 free processes",
    )
    assert max(r["at"] for r in runs) - sent < 5.0
    stage.env.release(release, 6)
    wait_for(lambda: len(stage.runs(f"holder-{held}-")) >= 6, 60, "the holders to end")


# -- the deferral budget ------------------------------------------------------------------------


def test_a_task_pushed_back_max_deferrals_times_runs_anyway(on_redis: Stage) -> None:
    """max_inflight=1, max_deferrals=3: the second task waits 0.5 + 1 + 2 s, then runs anyway."""
    stage = on_redis
    node = stage.start("budget")
    task = stage.app.tasks["tenants.budget"]
    stage.ready(node, lambda tag: task.delay(tenant=stage.tenant("warm"), tag=tag))
    tenant = stage.tenant("budget")
    release = stage.key("release-budget")
    task.delay(tenant=tenant, tag=f"budget-{tenant}-holder", release_key=release)
    stage.records.wait("started", f"budget-{tenant}-holder")
    sent = time.time()
    late = task.delay(tenant=tenant, tag=f"budget-{tenant}-late", release_key=release)
    (started,) = stage.records.wait("started", f"budget-{tenant}-late", timeout=15)
    assert started["id"] == late.id
    assert started["deferrals"] == 3
    # Pushed back 3 times (0.5, 1 and 2 s, each plus up to 0.15 s of jitter), never more.
    assert 3.5 - SLACK <= started["at"] - sent <= 3.5 + 0.5 + 1.0, started["at"] - sent
    assert not stage.records.find("done", f"budget-{tenant}-holder"), "the holder ended early"
    stage.env.release(release, 2)
    stage.records.wait("done", f"budget-{tenant}-late")
    stage.records.wait("done", f"budget-{tenant}-holder")
    assert len(stage.records.find("started", f"budget-{tenant}-late")) == 1


# -- the crash pool: a hard time limit, then kill -9 --------------------------------------------


def test_a_task_stopped_by_its_time_limit_gives_its_slot_back_at_once(
    on_redis: Stage, crashed: Crash
) -> None:
    """Both slots held by tasks the hard time limit kills: the third runs then, not in 63 s."""
    stage, node = on_redis, crashed.node
    task = stage.app.tasks["tenants.crash"]
    tenant = stage.tenant("overrun")
    never = stage.key("never")
    before = node.counters()
    sent = time.time()
    for i in range(2):
        task.apply_async((f"overrun-{tenant}-{i}", never, 30.0), headers={"X-Tenant": tenant})
    stage.records.wait("started", f"overrun-{tenant}-0")
    stage.records.wait("started", f"overrun-{tenant}-1")
    third = task.apply_async((f"overrun-{tenant}-third",), headers={"X-Tenant": tenant})
    (done,) = stage.records.wait("done", f"overrun-{tenant}-third", timeout=30)
    assert done["id"] == third.id
    # Not before the limit ended a holder (the node's 2 processes were both
    # taken), and long before a leaked lease would have expired (63 s).
    assert CRASH_TIME_LIMIT - SLACK <= done["at"] - sent <= CRASH_TIME_LIMIT + 10
    assert not stage.runs(f"overrun-{tenant}-0") and not stage.runs(f"overrun-{tenant}-1")
    counted = wait_for(
        lambda: (d := _delta(node.counters(), before))["timed_out"] >= 2 and d,
        10,
        "both holders to be counted as timed out",
    )
    assert counted["timed_out"] == 2 and counted["failed"] == 0
    assert stage.records.client.zcard(lease_key("crash", tenant)) == 0


def test_slots_of_killed_tasks_come_back_when_their_leases_expire(
    on_redis: Stage, crashed: Crash
) -> None:
    """kill -9 leaves two leases; the tenant's next tasks wait for them to expire, then run."""
    stage = on_redis
    bystanders = stage.records.wait("done", "bystander-0")
    bystanders += stage.records.wait("done", "bystander-1")
    # Another tenant ran at once on the new node: its slots are not the dead ones'.
    assert all(r["pid"] != crashed.first_pid for r in bystanders)
    assert all(r["at"] < crashed.killed_at + 20 for r in bystanders)
    wait_until = max(crashed.expiries) - time.time() + 20
    after = [
        stage.records.wait("done", f"after-{i}", timeout=max(wait_until, 5))[0] for i in range(3)
    ]
    assert len(stage.runs("after-", "started")) == 3, "a task started twice"
    started = {r["tag"]: r for r in stage.runs("after-", "started")}
    assert len(started) == 3
    first_expiry = crashed.expiries[0]
    for record in started.values():
        # Not before a dead lease expired; soon after (its countdown aims at the expiry).
        assert record["at"] >= first_expiry - SLACK, record["at"] - first_expiry
        assert record["at"] <= max(crashed.expiries) + 3.0, record["at"] - first_expiry
        assert record["deferrals"] and record["deferrals"] > 0
    assert {r["id"] for r in after} <= set(crashed.sent)
    # The killed tasks never ran again (acks_late=False: they were acknowledged).
    assert len(stage.runs("dead-", "started")) == 2
    assert not stage.runs("dead-")
    assert stage.records.client.zcard(lease_key("crash", crashed.tenant)) == 0


# -- lease renewal without a time limit ---------------------------------------------------------

RENEWED_LEASE = 1.5  # seconds, in the node (BULKHEAD_TEST_RENEWED_LEASE); 300 in production


@pytest.fixture(scope="module")
def renewing(on_redis: Stage) -> Node:
    """The one node of the ``renewed`` pool (no time limit), its leases 1.5 s long."""
    stage = on_redis
    node = stage.start("renewed", BULKHEAD_TEST_RENEWED_LEASE=str(RENEWED_LEASE))
    task = stage.app.tasks["tenants.renewed"]
    stage.ready(node, lambda tag: task.delay(tenant="warm-up", tag=tag))
    stage.tenants.add("warm-up")
    return node


def _holding(stage: Stage, tenant: str, tag: str, release: str) -> tuple[str, str, float]:
    """A ``renewed`` task of ``tenant``, started and holding its slot until ``release``.

    Answers its id, its tenant's lease key and its lease's first expiry (ms).
    """
    task = stage.app.tasks["tenants.renewed"]
    task_id = task.delay(tenant=tenant, tag=tag, release_key=release, seconds=60.0).id
    stage.records.wait("started", tag, timeout=30)
    key = lease_key("renewed", tenant)
    taken = stage.records.client.zscore(key, task_id)
    assert taken is not None
    return task_id, key, taken


def test_a_task_without_a_time_limit_keeps_its_slot_for_as_long_as_it_runs(
    on_redis: Stage, renewing: Node
) -> None:
    """max_inflight=1, no time limit: the first task runs for several lease lengths.

    Its lease is renewed meanwhile (its expiry keeps moving), so the tenant's
    second task waits until the first ends, then runs; the slot is released.
    """
    stage = on_redis
    task = stage.app.tasks["tenants.renewed"]
    tenant = stage.tenant("long")
    release = stage.key("release-long")
    first, key, taken = _holding(stage, tenant, f"long-{tenant}-0", release)
    leases = stage.records.client
    task.delay(tenant=tenant, tag=f"long-{tenant}-1", release_key=release, seconds=60.0)
    # Renewed again and again: the expiry moves on by three lease lengths and more ...
    wait_for(
        lambda: (leases.zscore(key, first) or 0) >= taken + 3 * RENEWED_LEASE * 1000,
        30,
        "the running task's lease to be renewed past three lease lengths",
    )
    # ... and all that time the tenant's second task did not start.
    assert not stage.runs(f"long-{tenant}-1", "started"), "a second task took the held slot"
    stage.env.release(release)
    stage.records.wait("started", f"long-{tenant}-1", timeout=30)
    stage.env.release(release)
    stage.records.wait("done", f"long-{tenant}-1", timeout=30)
    spans = _spans(stage, f"long-{tenant}-")
    assert _most_at_once(list(spans.values())) == 1
    wait_for(lambda: leases.zcard(key) == 0, 10, "the slots to be released")


def test_a_killed_workers_slots_come_back_within_one_lease_without_a_time_limit(
    on_redis: Stage, renewing: Node
) -> None:
    """kill -9 stops the renewals: the held slot comes back one lease length after, at most.

    (In production 5 minutes; here the node's lease is 1.5 s.)  The tenant's
    next task runs on the restarted node once the dead lease has expired.
    """
    stage, node = on_redis, renewing
    task = stage.app.tasks["tenants.renewed"]
    tenant = stage.tenant("killed")
    held, key, taken = _holding(stage, tenant, f"held-{tenant}", stage.key("never"))
    leases = stage.records.client
    wait_for(lambda: (leases.zscore(key, held) or 0) > taken, 10, "a renewal of the held lease")
    first_pid = node.child()
    assert first_pid is not None
    os.killpg(first_pid, signal.SIGKILL)
    killed_at = time.time()
    wait_for(lambda: not _alive(first_pid), 10, "the killed node to be gone", 0.01)
    expiry = (leases.zscore(key, held) or 0) / 1000
    # The last renewal came before the kill: the slot is free one lease length after, at most.
    assert expiry <= killed_at + RENEWED_LEASE + SLACK
    wait_for(lambda: node.child() not in (None, first_pid), 20, "the supervisor to restart it")
    after = task.delay(tenant=tenant, tag=f"after-{tenant}", seconds=0.0).id
    (done,) = stage.records.wait("done", f"after-{tenant}", timeout=60)
    assert done["id"] == after and done["pid"] != first_pid
    (started,) = stage.runs(f"after-{tenant}", "started")
    assert started["at"] >= expiry - SLACK, "the next task took the dead task's slot early"
    assert not stage.runs(f"held-{tenant}"), "the killed task finished after all"
    wait_for(lambda: leases.zcard(key) == 0, 10, "the slots to be released")
