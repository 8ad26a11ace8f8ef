"""Per-tenant limits at publish time, on real brokers: accurate, fair, bounded, and safe.

On a Redis broker whose tenant state lives in the same Redis, a publish
spends its tenant's token, checks the cap and pushes in one Lua call; on
RabbitMQ the token is spent with one call to the Redis state store.  Either
way: a flooding tenant gets its burst plus its rate and not a token more,
fleet-wide, whatever the producers' clocks say; a quiet tenant beside it
is never throttled; ``drop`` and ``defer`` do what they promise; an id that
is not a tenant id fails the publish before anything is sent; one-shot
tenants leave nothing behind; and a state store that is down or frozen
costs a publish at most its deadline, failing open or closed as configured.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
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
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection

from celery_bulkhead import ConfigurationError, TenantLimited, scripts
from celery_bulkhead.bulkhead import installed_on
from celery_bulkhead.results import DroppedResult
from celery_bulkhead.tenants import bucket_key
from tests.app.tenant_limits import TASK, hammer, make_limited_app
from tests.support import BROKERS, wait_for

#: Tenant state for RabbitMQ apps, and broker and state at once for Redis apps.
SHARED_REDIS = BROKERS["redis"]
PUBLISH_TIMEOUT = 1.0


# -- fixtures ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of the test's own on a free loopback port: to count, stop and freeze."""

    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        self.tmp = tmp
        self.server: subprocess.Popen[bytes] | None = None
        self.frozen = False
        self.start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(port=self.port, db=db, socket_timeout=10)

    def start(self) -> None:
        self.server = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                *("--bind", "127.0.0.1", "--port", str(self.port)),
                *("--save", "", "--appendonly", "no", "--dir", str(self.tmp)),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = self.client()
        wait_for(lambda: _pings(client), 10, "the private redis-server")
        client.close()

    def freeze(self) -> None:
        assert self.server is not None
        os.kill(self.server.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        assert self.server is not None
        os.kill(self.server.pid, signal.SIGCONT)
        self.frozen = False

    def stop(self) -> None:
        if self.server is None:
            return
        if self.frozen:
            self.thaw()
        self.server.kill()
        self.server.wait(timeout=10)
        self.server = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    yield server
    server.stop()


@dataclass
class Limited:
    """One broker, one queue prefix, one pool name (so tenant keys of the test's own)."""

    broker: str
    url: str
    state_url: str
    prefix: str = field(default_factory=lambda: f"bht{uuid.uuid4().hex[:10]}")
    pool: str = field(default_factory=lambda: f"tl{uuid.uuid4().hex[:10]}")

    @property
    def queue(self) -> str:
        return f"{self.prefix}.limited"

    def app_args(self) -> tuple[Any, ...]:
        return (self.url, self.prefix, self.pool)

    def app(self, **limit: Any) -> Celery:
        return make_limited_app(*self.app_args(), state_url=self.state_url, **limit)

    def depth(self) -> int:
        with Connection(self.url) as conn, conn.channel() as channel:
            try:
                return int(channel.queue_declare(queue=self.queue, passive=True).message_count)
            except conn.channel_errors:
                return 0

    def headers(self) -> list[dict[str, Any]]:
        """Take every message off the queue; their headers, oldest first."""
        found = []
        with Connection(self.url) as conn, conn.channel() as channel:
            while (received := channel.basic_get(self.queue, no_ack=True)) is not None:
                found.append(dict(received.headers))
        return found

    def cleanup(self) -> None:
        with Connection(self.url) as conn:
            for name in (self.queue, f"{self.prefix}.default"):
                with conn.channel() as channel, contextlib.suppress(*conn.channel_errors):
                    channel.queue_delete(name)
                if self.broker == "rabbitmq":
                    with conn.channel() as channel, contextlib.suppress(*conn.channel_errors):
                        channel.exchange_delete(name)
        # A new kombu connection knows no bindings, so on Redis queue_delete
        # deletes nothing: the queue's keys go by name.
        patterns = {self.state_url: [f"bulkhead:{{{self.pool}*"]}
        if self.broker == "redis":
            patterns.setdefault(self.url, []).extend(
                [f"{self.prefix}.*", f"_kombu.binding*.{self.prefix}.*"]
            )
        for url, matches in patterns.items():
            with contextlib.suppress(redis.RedisError):
                client = redis.Redis.from_url(url, socket_timeout=5)
                keys = [key for match in matches for key in client.scan_iter(match, count=1000)]
                if keys:
                    client.delete(*keys)
                client.close()


def _limited(broker: str, url: str | None = None, state_url: str | None = None) -> Limited:
    url = url or BROKERS[broker]
    with Connection(url) as conn:
        conn.ensure_connection(max_retries=1)  # a missing broker fails here, loudly
    return Limited(broker, url, state_url or (url if broker == "redis" else SHARED_REDIS))


@pytest.fixture(params=sorted(BROKERS))
def limited(request: pytest.FixtureRequest) -> Iterator[Limited]:
    """A Redis broker holding its tenant state, or RabbitMQ with the state in Redis."""
    env = _limited(request.param)
    yield env
    env.cleanup()


@pytest.fixture
def rabbitmq_with_private_state(private_redis: PrivateRedis) -> Iterator[Limited]:
    env = _limited("rabbitmq", state_url=private_redis.url())
    yield env
    env.cleanup()


def _pool(app: Celery) -> Any:
    bulkhead = installed_on(app)
    return next(iter(bulkhead.assignment.pools.values()))


# -- accuracy under a flood ----------------------------------------------------------------

PRODUCERS = 8
DURATION = 2.5
RATE, BURST = 40.0, 20
QUIET_EVERY = 0.1  # the quiet tenant: 10/s, a tenth of its rate


def test_a_flooding_tenant_gets_its_burst_and_rate_and_a_quiet_one_is_untouched(
    limited: Limited,
) -> None:
    """8 producer processes flood one tenant: admitted = burst + rate x elapsed, fleet-wide."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.app.tenant_limits"])
    barrier = context.Barrier(PRODUCERS + 1)
    results = context.Queue()
    app_kwargs = {"state_url": limited.state_url, "rate": RATE, "burst": BURST}
    producers = [
        context.Process(
            target=hammer,
            args=(limited.app_args(), app_kwargs, "flood", DURATION, barrier, results),
            daemon=True,
        )
        for _ in range(PRODUCERS)
    ]
    for process in producers:
        process.start()
    try:
        task = limited.app(rate=RATE, burst=BURST).tasks[TASK]
        task.delay(tenant="warm-up-quiet")
        barrier.wait(timeout=60)
        quiet = 0
        until = time.monotonic() + DURATION
        while time.monotonic() < until:
            task.delay(tenant="quiet")  # never TenantLimited: it would fail the test here
            quiet += 1
            time.sleep(QUIET_EVERY)  # pacing the quiet tenant, not waiting on a condition
        reports = [results.get(timeout=30) for _ in producers]
    finally:
        for process in producers:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    admitted = sorted(span for spans, _, _, _ in reports for span in spans)
    refused = sum(count for _, count, _, _ in reports)
    assert sum(count for _, _, _, count in reports) == 0  # no errors
    assert quiet >= DURATION / QUIET_EVERY / 2
    flooded = len(admitted) + refused
    assert flooded > 5 * RATE * DURATION, "the flood was not far above the rate"

    # Each decision is taken on Redis time somewhere within its publish call,
    # so bound the elapsed time both ways.  At most: the burst and one token per
    # interval from the first admitted decision to the last.  At least: all that
    # had come due by the last refusal (the bucket was empty then); a flood
    # this dense never leaves a burst-sized gap in which a full bucket would
    # overflow.
    first_start, first_end = admitted[0][0], min(end for _, end in admitted)
    last_end = max(end for _, end in admitted)
    last_refused = max(last for _, _, last, _ in reports)
    longest, shortest = last_end - first_start, last_refused - first_end
    slack = 1 + 0.01 * RATE * longest
    low, high = BURST + RATE * shortest - slack, BURST + RATE * longest + slack
    assert low <= len(admitted) <= high, (
        f"{len(admitted)} admitted of {flooded}, expected {BURST} + {RATE:g}/s x "
        f"[{shortest:.3f}, {longest:.3f}] s +- {slack:.1f}"
    )
    # Nothing admitted was lost, nothing refused was pushed: the queue holds exactly them.
    expected = len(admitted) + quiet + PRODUCERS + 1  # and each producer's warm-up
    wait_for(lambda: limited.depth() == expected, 15, f"{expected} messages in the queue")


# -- on_limited -----------------------------------------------------------------------------


def test_drop_returns_a_dropped_result_that_raises_tenant_limited(limited: Limited) -> None:
    task = limited.app(rate="1/s", burst=1, on_limited="drop").tasks[TASK]
    first = task.delay(tenant="acme")
    assert not isinstance(first, DroppedResult) and first.dropped is False
    dropped = task.delay(tenant="acme")
    assert isinstance(dropped, DroppedResult) and dropped.dropped
    assert dropped.ready() and dropped.failed() and dropped.state == "FAILURE"
    with pytest.raises(TenantLimited) as error:
        dropped.get(timeout=1)
    assert error.value.pool == limited.pool
    assert error.value.tenant == "acme"
    assert 0 < error.value.retry_after <= 1.0
    assert error.value.task_id == dropped.id
    assert not isinstance(task.delay(tenant="globex"), DroppedResult)  # its own bucket
    wait_for(lambda: limited.depth() == 2, 10, "2 messages in the queue")


def test_defer_publishes_with_an_eta_spaced_at_the_rate(limited: Limited) -> None:
    interval = 0.2
    task = limited.app(rate="5/s", burst=1, on_limited="defer", max_defer=0.65).tasks[TASK]
    warm_up = task.delay(tenant="warm-up")
    started = time.time()
    results = [task.delay(tenant="acme", n=n) for n in range(4)]
    assert not any(isinstance(result, DroppedResult) for result in results)
    # The 5th slot is 0.8 s ahead, beyond max_defer: refused, not deferred further.
    with pytest.raises(TenantLimited) as beyond:
        task.delay(tenant="acme", n=4)
    assert beyond.value.retry_after > 0.65
    elapsed = time.time() - started
    wait_for(lambda: limited.depth() == 5, 10, "5 messages in the queue")
    headers = {h["id"]: h for h in limited.headers()}
    assert set(headers) == {result.id for result in [warm_up, *results]}
    assert headers[results[0].id].get("eta") is None  # the burst: now
    etas = [datetime.fromisoformat(headers[result.id]["eta"]).timestamp() for result in results[1:]]
    for k, eta in enumerate(etas, start=1):  # slots at 1, 2 and 3 intervals
        assert started + k * interval - 0.05 <= eta <= started + elapsed + k * interval + 0.05
    for earlier, later in itertools.pairwise(etas):
        assert later - earlier == pytest.approx(interval, abs=0.1)


# -- one call, Redis time ---------------------------------------------------------------------


def _monitored(private_redis: PrivateRedis, publish: Callable[[], None]) -> list[dict[str, Any]]:
    """The commands clients sent to ``private_redis`` while ``publish()`` ran."""
    commands: list[dict[str, Any]] = []
    stop = f"stop-{uuid.uuid4().hex}"
    with private_redis.client().monitor() as monitor:
        ready = threading.Event()

        def watch() -> None:
            ready.set()
            for command in monitor.listen():
                commands.append(command)
                if stop in command["command"]:
                    return

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        ready.wait(5)
        publish()
        private_redis.client().echo(stop)
        thread.join(timeout=10)
    return [c for c in commands if c.get("client_type") != "lua"]


def _three_then_refused(task: Any, refused: list[TenantLimited]) -> None:
    """Three publishes for acme (its burst of 3), then a fourth, refused, into ``refused``."""
    for _ in range(3):
        task.delay(tenant="acme")
    try:
        task.delay(tenant="acme")
    except TenantLimited as exc:
        refused.append(exc)


def test_on_a_redis_broker_bucket_cap_and_push_are_one_call(
    private_redis: PrivateRedis,
) -> None:
    env = _limited("redis", url=private_redis.url())
    app = env.app(rate="2/s", burst=3, max_queue=100)
    task = app.tasks[TASK]
    assert installed_on(app).admission._one_call(_pool(app))
    task.delay(tenant="warm-up")  # declared, connected, scripts loaded
    bucket = bucket_key(env.pool, "acme").encode()
    refused: list[TenantLimited] = []
    from_clients = _monitored(private_redis, lambda: _three_then_refused(task, refused))
    assert len(refused) == 1 and 0 < refused[0].retry_after <= 0.5
    on_bucket = [c for c in from_clients if bucket.decode() in c["command"]]
    # Every publish, admitted or not, touched its bucket in exactly one call...
    assert len(on_bucket) == 4, on_bucket
    assert all(c["command"].upper().startswith("EVALSHA") for c in on_bucket)
    # ... which pushed the admitted ones: nothing else pushed or read the bucket.
    for c in from_clients:
        verb = c["command"].split(" ", 1)[0].strip('"').upper()
        assert verb not in ("LPUSH", "RPUSH", "GET", "SET", "EVAL"), c["command"]
    assert private_redis.client().llen(env.queue) == 4  # warm-up and 3 admitted
    env.cleanup()


def test_with_state_apart_from_the_broker_each_publish_costs_one_state_call(
    rabbitmq_with_private_state: Limited, private_redis: PrivateRedis
) -> None:
    """RabbitMQ with the state in Redis: one bucket call per publish, admitted or refused.

    3 tokens admit 3 publishes and refuse the 4th, over the store's own connection.
    """
    env = rabbitmq_with_private_state
    task = env.app(rate="2/s", burst=3, max_queue=100).tasks[TASK]
    task.delay(tenant="warm-up")  # connected to both, script loaded
    bucket = bucket_key(env.pool, "acme")
    refused: list[TenantLimited] = []
    commands = _monitored(private_redis, lambda: _three_then_refused(task, refused))
    on_bucket = [c for c in commands if bucket in c["command"]]
    assert len(on_bucket) == 4, on_bucket
    assert all(c["command"].upper().startswith("EVALSHA") for c in on_bucket)
    assert len(refused) == 1 and 0 < refused[0].retry_after <= 0.5
    wait_for(lambda: env.depth() == 4, 10, "the warm-up and the 3 admitted in the queue")


def test_a_publish_that_fails_before_admission_spends_no_token(
    rabbitmq_with_private_state: Limited,
) -> None:
    """Celery refuses a bad ``countdown`` while building the message: no token is spent."""
    env = rabbitmq_with_private_state
    task = env.app(rate="1/s", burst=2, max_queue=100).tasks[TASK]
    task.delay(tenant="warm-up")
    with pytest.raises((TypeError, ValueError)):
        task.apply_async(kwargs={"tenant": "acme"}, countdown="soon")
    for _ in range(2):
        task.delay(tenant="acme")  # both of acme's tokens are still there
    assert not _admitted(task, "acme")
    wait_for(lambda: env.depth() == 3, 10, "warm-up and acme x2 in the queue")


def test_a_retry_spends_no_token_and_sends_no_state_call(
    rabbitmq_with_private_state: Limited, private_redis: PrivateRedis
) -> None:
    """A retry bypasses the tenant gate: no call to the state store, no token spent."""
    env = rabbitmq_with_private_state
    task = env.app(rate="1/s", burst=2, max_queue=100).tasks[TASK]
    task.delay(tenant="warm-up")
    bucket = bucket_key(env.pool, "acme")

    def publish() -> None:
        for _ in range(5):
            task.apply_async(kwargs={"tenant": "acme"}, retries=1)

    commands = _monitored(private_redis, publish)
    assert not [c["command"] for c in commands if bucket in c["command"]]
    for _ in range(2):
        task.delay(tenant="acme")  # both tokens still there
    assert not _admitted(task, "acme")
    wait_for(lambda: env.depth() == 3, 10, "warm-up and 2 admitted in the queue")

    def continued() -> int:  # retries go to the pool's continuation queue
        with Connection(env.url) as conn, conn.channel() as channel:
            declared = channel.queue_declare(queue=f"{env.queue}.continue", passive=True)
            return int(declared.message_count)

    wait_for(lambda: continued() == 5, 10, "the 5 retries in the continuation queue")
    with Connection(env.url) as conn, conn.channel() as channel:
        channel.queue_delete(f"{env.queue}.continue")


def test_the_one_call_path_is_used_only_where_it_is_exact() -> None:
    redis_env = _limited("redis")
    assert installed_on(app := redis_env.app(rate=1)).admission._one_call(_pool(app))
    # A reservation rewrites the message's ETA before the push: its own call.
    assert not installed_on(app := redis_env.app(rate=1, on_limited="defer")).admission._one_call(
        _pool(app)
    )
    elsewhere = Limited("redis", redis_env.url, "redis://127.0.0.1:6379/8")
    assert not installed_on(app := elsewhere.app(rate=1)).admission._one_call(_pool(app))
    rabbit = _limited("rabbitmq")
    assert not installed_on(app := rabbit.app(rate=1)).admission._one_call(_pool(app))


def test_a_producer_clock_offset_changes_nothing(
    limited: Limited, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decisions are taken on Redis time: a producer an hour off gets no extra tokens."""
    task = limited.app(rate="2/s", burst=2).tasks[TASK]
    task.delay(tenant="warm-up")
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    task.delay(tenant="acme")
    task.delay(tenant="acme")
    with pytest.raises(TenantLimited) as ahead:
        task.delay(tenant="acme")
    monkeypatch.setattr(time, "time", lambda: real() - 3600)
    refused_at = time.monotonic()  # the refusal is decided after this
    with pytest.raises(TenantLimited) as behind:
        task.delay(tenant="acme")
    for refused in (ahead.value, behind.value):
        assert 0 < refused.retry_after <= 0.5  # one interval, not an hour
    wait_for(lambda: _admitted(task, "acme"), 5, "the next token", interval=0.02)
    assert time.monotonic() - refused_at >= behind.value.retry_after - 0.005


def _admitted(task: Any, tenant: str) -> bool:
    try:
        task.delay(tenant=tenant)
    except TenantLimited:
        return False
    return True


# -- nothing left behind ------------------------------------------------------------------------

ONE_SHOT = 100_000


def _without_ttl(client: redis.Redis) -> int:
    """Keys in the database that never expire (INFO keyspace counts both, exactly)."""
    keyspace = client.info("keyspace").get("db0", {})
    return int(keyspace.get("keys", 0)) - int(keyspace.get("expires", 0))


def test_one_shot_tenants_leave_no_key_behind(private_redis: PrivateRedis) -> None:
    """100k tenants seen once: every key they leave expires, and all of them go."""
    client = private_redis.client()
    env = _limited("redis", url=private_redis.url())
    task = env.app(rate="1000/s", burst=1).tasks[TASK]  # a bucket lives ~1 ms
    task.delay(tenant="warm-up")
    # The queue and kombu's binding sets: the only keys meant to stay.
    kept = len([key for key in client.keys("*") if not key.startswith(b"bulkhead:")])
    assert _without_ttl(client) == kept
    # Through the real publish path (the one-call push) ...
    published = 2000
    for n in range(published):
        task.delay(tenant=f"visitor-{n}")
    assert _without_ttl(client) == kept
    # ... and at scale, through the store's own script, called as the store calls it.
    pool = f"tl{uuid.uuid4().hex[:10]}"
    bucket = scripts.load("bucket")
    client.script_load(bucket.text)
    for start in range(0, ONE_SHOT, 10_000):
        with client.pipeline(transaction=False) as pipe:
            for n in range(start, start + 10_000):
                key = bucket_key(pool, f"one-shot-{n}")
                pipe.evalsha(bucket.sha, 1, key, b"1000", b"1", b"0")
            answers = pipe.execute()
        assert all(int(wait) == 0 for wait in answers)  # new tenants: full buckets, allowed now
        assert _without_ttl(client) == kept, "a tenant key without a TTL"
    assert client.llen(env.queue) == published + 1
    wait_for(lambda: client.dbsize() == kept, 30, "every tenant key to expire", 0.2)
    assert not list(client.scan_iter(match="bulkhead:*", count=5000))
    env.cleanup()


# -- untrusted ids ------------------------------------------------------------------------------

BAD_IDS: list[Any] = [
    None,
    True,
    2.5,
    b"acme",
    ["acme"],
    {"id": "acme"},
    "",
    "x" * 129,
    "\u00e9" * 64 + "a",
    "acme\nX-Evil: 1",
    "acme\u2028",
    "acme\x00",
    "\ud800",
    10**200,  # (10**5000 never gets this far: Celery's own argsrepr refuses it first)
]


def test_a_bad_tenant_id_fails_the_publish_before_anything_is_sent(limited: Limited) -> None:
    task = limited.app(rate=1000, burst=1000).tasks[TASK]
    task.delay(tenant="acme")
    wait_for(lambda: limited.depth() == 1, 10, "the good message")
    for value in BAD_IDS:
        started = time.monotonic()
        with pytest.raises(ConfigurationError) as error:
            task.delay(tenant=value)
        assert time.monotonic() - started < 0.5
        assert error.value.pool == limited.pool
        assert error.value.setting == "tenant id"
        assert "acme" not in str(error.value)
    with pytest.raises(ConfigurationError) as missing:
        task.delay()  # no tenant at all
    assert missing.value.setting == "tenant.key"
    assert limited.depth() == 1
    state = redis.Redis.from_url(limited.state_url)
    keys = set(state.scan_iter(match=f"bulkhead:{{{limited.pool}:*", count=1000))
    assert keys <= {bucket_key(limited.pool, "acme").encode()}  # no bucket for a bad id


# -- the state store down or frozen --------------------------------------------------------------

#: A publish ends within its deadline (publish_timeout) and a margin for scheduling.
BOUND = PUBLISH_TIMEOUT + 1.5
FAULTS: dict[str, Callable[[PrivateRedis], None]] = {
    "stopped": PrivateRedis.stop,
    "frozen": PrivateRedis.freeze,
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("mode", ["allow", "deny"])
def test_a_state_outage_fails_open_or_closed_within_the_deadline(
    rabbitmq_with_private_state: Limited, private_redis: PrivateRedis, mode: str, fault: str
) -> None:
    env = rabbitmq_with_private_state
    app = env.app(
        rate=1000, burst=1000, on_state_error=mode, max_queue=100, publish_timeout=PUBLISH_TIMEOUT
    )
    task = app.tasks[TASK]
    task.delay(tenant="acme")  # connected to both, script loaded
    FAULTS[fault](private_redis)
    for _ in range(2):  # not only the first publish after the fault
        started = time.monotonic()
        if mode == "allow":
            task.delay(tenant="acme")
        else:
            with pytest.raises(TenantLimited) as denied:
                task.delay(tenant="acme")
            assert denied.value.retry_after > 0
        elapsed = time.monotonic() - started
        assert elapsed < BOUND, f"a publish took {elapsed:.2f}s"
    expected = 3 if mode == "allow" else 1
    wait_for(lambda: env.depth() == expected, 10, f"{expected} messages in the queue")
    if fault == "frozen":
        private_redis.thaw()
    else:
        private_redis.start()
    wait_for(lambda: _admitted(task, "acme"), 10, "a publish once the state is back", 0.05)


@pytest.mark.parametrize("broker", sorted(BROKERS))
def test_scripts_reload_after_script_flush_and_restart(
    private_redis: PrivateRedis, broker: str
) -> None:
    """No NOSCRIPT reaches the user: the script is registered again, and still counts."""
    if broker == "redis":
        env = _limited("redis", url=private_redis.url())
    else:
        env = _limited("rabbitmq", state_url=private_redis.url())
    # Fail closed: a publish the store could not answer would raise, not pass.
    task = env.app(rate="1/s", burst=3, on_state_error="deny").tasks[TASK]
    try:
        task.delay(tenant="acme")
        private_redis.client().script_flush()
        task.delay(tenant="acme")  # NOSCRIPT: registered again, transparently
        task.delay(tenant="acme")
        with pytest.raises(TenantLimited) as refused:
            task.delay(tenant="acme")  # and it still counts: 3 tokens, 3 publishes
        assert 0 < refused.value.retry_after <= 1.0
        private_redis.stop()
        private_redis.start()  # state and scripts gone, connections broken
        for _ in range(3):
            task.delay(tenant="acme")  # a full bucket again, on a new connection
        with pytest.raises(TenantLimited) as refused:
            task.delay(tenant="acme")
        assert 0 < refused.value.retry_after <= 1.0
    finally:
        env.cleanup()
