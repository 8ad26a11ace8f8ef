"""Worker metrics: one loopback endpoint per pool node, exact under prefork, no secrets."""

from __future__ import annotations

import socket
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from celery_bulkhead import Bulkhead, Pool
from celery_bulkhead.status import collect
from celery_bulkhead.worker.metrics import PoolMetrics, _Histogram
from tests.app.shop import make_app
from tests.e2e.conftest import BROKERS, Env, wait_for

METERED_INDEX = 3  # the "metered" pool is the 4th declared: base port + 3


def free_base_port() -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1] - METERED_INDEX
        if base > 1024:
            return base
    raise AssertionError("no free port")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def raw(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def listening_addresses(port: int) -> set[str]:
    """Local addresses listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as table:
                lines = table.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if int(hex_port, 16) == port and state == "0A":  # LISTEN
                found.add(address)
    return found


def start_metered(env: Env, port_base: int) -> int:
    env.start("--pool", "metered", extra_env={"BULKHEAD_TEST_METRICS_PORT": str(port_base)})
    port = port_base + METERED_INDEX
    wait_for(lambda: _up(port), 60, "the metrics endpoint")
    return port


def _up(port: int) -> bool:
    try:
        raw(port)
        return True
    except OSError:
        return False


def test_prefork_counts_equal_tasks_run(env: Env) -> None:
    """Concurrency-4 prefork: tasks_total and both histograms' counts equal the tasks run."""
    port = start_metered(env, free_base_port())
    task = env.app.tasks["shop.metered"]
    ok, failing = 40, 5
    for i in range(ok):
        task.delay(f"ok-{i}")
    for i in range(failing):
        task.delay(f"bad-{i}", fail=True)
    for i in range(ok):
        env.records.wait("done", f"ok-{i}", timeout=60)

    def settled() -> dict | None:
        samples = scrape(port)
        done = (
            value(samples, "celery_bulkhead_tasks_total", pool="metered", outcome="succeeded") or 0
        ) + (value(samples, "celery_bulkhead_tasks_total", pool="metered", outcome="failed") or 0)
        return samples if done == ok + failing else None

    samples = wait_for(settled, 30, "all outcomes to be counted")
    assert value(samples, "celery_bulkhead_tasks_total", pool="metered", outcome="succeeded") == ok
    assert (
        value(samples, "celery_bulkhead_tasks_total", pool="metered", outcome="failed") == failing
    )
    total = ok + failing
    assert value(samples, "celery_bulkhead_task_duration_seconds_count", pool="metered") == total
    assert value(samples, "celery_bulkhead_queue_wait_seconds_count", pool="metered") == total
    assert value(samples, "celery_bulkhead_inflight", pool="metered") == 0
    assert value(samples, "celery_bulkhead_concurrency", pool="metered") == 4
    assert value(samples, "celery_bulkhead_queue_cap", pool="metered") == 1000
    assert value(samples, "celery_bulkhead_consumers", pool="metered") == 1
    assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only


def test_queue_depth_is_the_brokers_count_including_priorities(env: Env) -> None:
    port = start_metered(env, free_base_port())
    task = env.app.tasks["shop.metered"]
    release = env.key("release")
    for i in range(4):  # every process busy, prefetch 1: nothing more is reserved
        task.delay(f"busy-{i}", release_key=release)
    for i in range(4):
        env.records.wait("started", f"busy-{i}", timeout=60)
    for i in range(7):
        task.apply_async(args=[f"queued-{i}"], priority=i % 10)
    queue = f"{env.prefix}.metered"
    wait_for(lambda: env.ready_messages(queue) == 7, 10, "7 ready messages")
    depth = wait_for(
        lambda: value(scrape(port), "celery_bulkhead_queue_depth", pool="metered") == 7,
        10,
        "the scraped depth to reach 7",
    )
    assert depth
    samples = scrape(port)
    assert value(samples, "celery_bulkhead_inflight", pool="metered") == 4
    if env.broker == "redis":
        client = redis.Redis.from_url(env.url)
        lists = list(client.scan_iter(match=f"{queue}*"))
        assert len(lists) > 1  # priorities really spread over sub-lists
        assert sum(client.llen(key) for key in lists if not key.endswith(b".continue")) == 7
    env.release(release, 4)
    for i in range(7):
        env.records.wait("done", f"queued-{i}", timeout=60)


@pytest.fixture
def canary_user() -> Iterator[tuple[str, str]]:
    """A Redis ACL user whose password must never appear in metrics or logs."""
    user, password = f"bh{uuid.uuid4().hex[:6]}", f"canary{uuid.uuid4().hex}"
    admin = redis.Redis.from_url(BROKERS["redis"])
    admin.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{password}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all"],
    )
    yield user, password
    admin.acl_deluser(user)


def test_a_broker_password_appears_nowhere(
    env: Env,
    canary_user: tuple[str, str],
) -> None:
    if env.broker != "redis":  # the canary is a Redis ACL user; RabbitMQ uses guest/guest
        env.url = env.url  # same assertions on the guest password would be meaningless
    user, password = canary_user
    env.url = f"redis://{user}:{password}@127.0.0.1:6379/9"
    env.app = make_app(env.url, env.prefix)
    port = start_metered(env, free_base_port())
    env.app.tasks["shop.metered"].delay("canary")
    env.records.wait("done", "canary", timeout=60)
    wait_for(
        lambda: (
            value(scrape(port), "celery_bulkhead_tasks_total", pool="metered", outcome="succeeded")
            == 1
        ),
        20,
        "the task to be counted",
    )
    assert password not in raw(port)
    assert password not in env.workers[-1].log()


def test_histogram_buckets_are_less_or_equal_and_cumulative() -> None:
    """A value equal to a bound counts in that bucket (Prometheus ``le``); larger ones in +Inf."""
    histogram = _Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        histogram.observe(value)
    family = histogram.family("x_seconds", "x", "p")
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "x_seconds_bucket"}
    assert buckets == {"0.1": 2, "1.0": 4, "+Inf": 5}
    (total,) = [s.value for s in family.samples if s.name == "x_seconds_sum"]
    assert total == pytest.approx(8.65)


def test_depth_counts_every_priority_under_a_redis_key_prefix() -> None:
    """``status`` and the worker's queue_depth agree with Redis when kombu prefixes keys."""
    prefix = f"bhk{uuid.uuid4().hex[:8]}"
    app = Celery("keyprefix", broker=BROKERS["redis"], set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        task_default_queue=f"{prefix}.default",
        broker_transport_options={"global_keyprefix": f"{prefix}:"},
    )
    bulkhead = Bulkhead(app, pools=[Pool("deep", max_queue=100, queue=f"{prefix}.deep")])

    @app.task(bulkhead="deep", name="keyprefix.noop", shared=False)
    def noop() -> None: ...

    client = redis.Redis.from_url(BROKERS["redis"])
    try:
        for i in range(5):
            noop.apply_async(priority=i * 2)
        lists = list(client.scan_iter(match=f"{prefix}:{prefix}.deep*"))
        assert len(lists) > 1  # prefixed, and spread over priority sub-lists
        (status,) = collect(app, list(bulkhead.pools), timeout=0.2)
        assert status.depth == 5
        registry = PoolMetrics(app, bulkhead.pool("deep")).registry
        assert registry.get_sample_value("celery_bulkhead_queue_depth", {"pool": "deep"}) == 5
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        app.close()
