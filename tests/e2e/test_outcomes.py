"""Every way a pool task can end is counted under its own outcome, scraped from a real worker.

One prefork ``celery -A tests.app.outcomes bulkhead worker --pool outcomes``
node per broker serves the whole module (started on first use); each test
reads the counters before and after its tasks and asserts the difference:
exactly the expected outcomes moved, nothing else did, nothing is left in
flight.
"""

from __future__ import annotations

import contextlib
import math
import socket
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection
from prometheus_client.parser import text_string_to_metric_families

from celery_bulkhead.message import PUBLISHED_AT
from celery_bulkhead.worker.request import OUTCOMES
from tests.app.outcomes import POOL, make_outcomes_app
from tests.e2e.conftest import BROKERS, Env, Records, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

#: Long enough for a prefork node to start, and for a time limit to fire and be reported.
STARTUP = 60.0
SETTLE = 30.0


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


@dataclass
class Node:
    """The ``outcomes`` pool's worker node on one broker, and its metrics endpoint."""

    env: Env
    port: int

    @property
    def queue(self) -> str:
        return f"{self.env.prefix}.{POOL}"

    def task(self, name: str) -> Any:
        return self.env.app.tasks[f"outcomes.{name}"]

    def scrape(self) -> Samples:
        samples = _scrape(self.port)
        assert samples is not None, "the metrics endpoint stopped answering"
        return samples

    def outcomes(self, samples: Samples | None = None) -> dict[str, float]:
        samples = self.scrape() if samples is None else samples
        return {
            outcome: samples[
                ("celery_bulkhead_tasks_total", (("outcome", outcome), ("pool", POOL)))
            ]
            for outcome in OUTCOMES
        }

    def counted(self, expected: dict[str, int], run: Callable[[], None]) -> Samples:
        """Run ``run``; once ``expected`` outcomes have moved, assert nothing else did.

        Also asserts that nothing is left in flight; returns the samples after.
        """
        before = self.outcomes()
        run()
        total = sum(expected.values())

        def settled() -> Samples | None:
            samples = self.scrape()
            after = self.outcomes(samples)
            moved = sum(after[o] - before[o] for o in OUTCOMES)
            return samples if moved >= total else None

        samples = wait_for(settled, SETTLE, f"{total} task outcome(s) to be counted")
        after = self.outcomes(samples)
        delta = {o: after[o] - before[o] for o in OUTCOMES}
        assert delta == {o: expected.get(o, 0) for o in OUTCOMES}
        assert value(samples, "celery_bulkhead_inflight") == 0
        return samples


def value(samples: Samples, name: str) -> float:
    """The pool's sample ``name`` (a KeyError when the endpoint does not export it)."""
    return samples[(name, (("pool", POOL),))]


@dataclass
class Nodes:
    """Starts one node per broker on first use; stops them and cleans up at the end."""

    prefix: str
    records_client: redis.Redis
    tmp: Path
    started: dict[str, Node] = field(default_factory=dict)

    def get(self, broker: str) -> Node:
        if broker not in self.started:
            url = BROKERS[broker]
            prefix = f"{self.prefix}-out-{broker}-{uuid.uuid4().hex[:6]}"
            with Connection(url) as conn:
                conn.ensure_connection(max_retries=1)  # a missing broker fails here
            env = Env(
                broker,
                url,
                prefix,
                make_outcomes_app(url, prefix),
                Records(self.records_client, f"{prefix}:log"),
                self.tmp / broker,
                "tests.app.outcomes",
            )
            env.tmp.mkdir()
            port = _free_port()
            env.start("--pool", POOL, extra_env={"BULKHEAD_TEST_METRICS_PORT": str(port)})
            self.started[broker] = node = Node(env, port)
            wait_for(lambda: _scrape(port), STARTUP, f"the {broker} node's metrics endpoint")
            # The endpoint answers before the consumer runs: wait for a task to go through.
            node.counted({"succeeded": 1}, lambda: node.task("succeed").delay("warm-up"))
        return self.started[broker]

    def close(self, dump_logs: bool) -> None:
        for node in self.started.values():
            env = node.env
            for worker in env.workers:
                worker.stop()
                if dump_logs:
                    sys.stderr.write(f"\n--- {env.broker} worker log ---\n{worker.log()[-8000:]}\n")
            with Connection(env.url) as conn:
                for name in (node.queue, f"{env.prefix}.default"):
                    with conn.channel() as channel, contextlib.suppress(conn.channel_errors):
                        channel.queue_delete(name)
                    if env.url.startswith("amqp"):
                        with conn.channel() as channel, contextlib.suppress(conn.channel_errors):
                            channel.exchange_delete(name)
            keys = list(self.records_client.scan_iter(match=f"{env.prefix}:*"))
            if keys:
                self.records_client.delete(*keys)
            env.app.close()


@pytest.fixture(scope="module")
def nodes(
    request: pytest.FixtureRequest,
    session_prefix: str,
    records_client: redis.Redis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Nodes]:
    failed_before = request.session.testsfailed
    started = Nodes(session_prefix, records_client, tmp_path_factory.mktemp("outcomes"))
    yield started
    started.close(dump_logs=request.session.testsfailed > failed_before)


@pytest.fixture(params=sorted(BROKERS))
def node(request: pytest.FixtureRequest, nodes: Nodes) -> Node:
    """The outcomes node on each broker (shared by the module)."""
    return nodes.get(request.param)


# -- one test per outcome -------------------------------------------------------------


def test_a_task_that_returns_is_counted_succeeded(node: Node) -> None:
    """Each run is timed too."""
    before = node.scrape()

    def run() -> None:
        for i in range(3):
            node.task("succeed").delay(f"ok-{i}")

    samples = node.counted({"succeeded": 3}, run)
    timed = "celery_bulkhead_task_duration_seconds_count"
    assert value(samples, timed) == value(before, timed) + 3


def test_a_task_that_raises_is_counted_failed(node: Node) -> None:
    def run() -> None:
        for i in range(2):
            node.task("fail").delay(f"bad-{i}")

    node.counted({"failed": 2}, run)


def test_autoretry_then_success_counts_each_retry_and_one_success(node: Node) -> None:
    """Two ``autoretry_for`` retries, then a success: retried=2, succeeded=1, failed=0."""
    before = node.scrape()
    samples = node.counted(
        {"retried": 2, "succeeded": 1}, lambda: node.task("autoretry").delay("auto", failures=2)
    )
    node.env.records.wait("done", "auto")
    # Every run is timed, and every retry is a new publish whose wait is observed.
    for name in (
        "celery_bulkhead_task_duration_seconds_count",
        "celery_bulkhead_queue_wait_seconds_count",
    ):
        assert value(samples, name) == value(before, name) + 3, name


def test_self_retry_then_success_counts_each_retry_and_one_success(node: Node) -> None:
    node.counted(
        {"retried": 1, "succeeded": 1}, lambda: node.task("self_retry").delay("manual", failures=1)
    )
    node.env.records.wait("done", "manual")


def test_autoretry_exhausted_counts_every_retry_then_one_failure(node: Node) -> None:
    """max_retries=3: three retries, then the fourth run's exception is a failure."""
    node.counted(
        {"retried": 3, "failed": 1}, lambda: node.task("autoretry").delay("gave-up", failures=9)
    )


def test_self_retry_exhausted_counts_every_retry_then_one_failure(node: Node) -> None:
    node.counted(
        {"retried": 2, "failed": 1}, lambda: node.task("self_retry").delay("gave-up", failures=9)
    )


def test_a_hard_time_limit_is_counted_timed_out(node: Node) -> None:
    """The prefork child is killed at the task's time_limit; the node counts it, not a failure."""
    node.counted({"timed_out": 1}, lambda: node.task("hard_limit").delay("hard"))
    node.env.records.wait("started", "hard")


def test_an_unhandled_soft_time_limit_is_counted_timed_out(node: Node) -> None:
    node.counted({"timed_out": 1}, lambda: node.task("soft_limit").delay("soft"))


def test_raise_reject_is_counted_rejected(node: Node) -> None:
    node.counted({"rejected": 1}, lambda: node.task("reject").delay("reject"))


def test_raise_ignore_is_counted_ignored(node: Node) -> None:
    node.counted({"ignored": 1}, lambda: node.task("ignore").delay("ignore"))


def _revoke(node: Node, task_id: str, **options: Any) -> None:
    """Revoke ``task_id`` on the node and wait until it says it did."""
    replies = node.env.app.control.revoke(
        task_id,
        destination=[f"{POOL}@{socket.gethostname()}"],
        reply=True,
        limit=1,
        timeout=10,
        **options,
    )
    assert replies, "the node did not confirm the revoke"


def test_revoke_terminate_of_a_running_task_is_counted_revoked(node: Node) -> None:
    release = f"{node.env.prefix}:release:{uuid.uuid4().hex[:8]}"

    def run() -> None:
        result = node.task("hang").delay("revoked", release_key=release)
        node.env.records.wait("started", "revoked")
        _revoke(node, result.id, terminate=True)

    node.counted({"revoked": 1}, run)
    assert node.env.records.find("done", "revoked") == []


def test_a_task_revoked_before_it_starts_is_not_counted(node: Node) -> None:
    """It never runs on the node: no outcome, nothing in flight."""
    task_id = str(uuid.uuid4())

    def run() -> None:
        _revoke(node, task_id)
        node.task("succeed").apply_async(args=["revoked-early"], task_id=task_id)
        node.task("succeed").delay("after-revoked")

    node.counted({"succeeded": 1}, run)
    node.env.records.wait("done", "after-revoked")
    assert node.env.records.find("done", "revoked-early") == []


# -- malformed headers ------------------------------------------------------------


def _foreign_producer(url: str) -> Celery:
    """A producer without the Bulkhead: nothing stamps or checks its headers."""
    app = Celery("foreign", broker=url, set_as_current=False)
    app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True)
    return app


def test_malformed_published_at_headers_are_counted_and_never_observed(node: Node) -> None:
    """Impossible times never reach the wait histogram nor unbalance in-flight; good ones do."""
    year = 365 * 24 * 3600.0
    malformed: list[Any] = [
        -1e308,
        1e308,  # a huge positive float: a publish far in the future
        "yesterday",
        str(time.time()),  # a number, but as text
        True,
        time.time() - 2 * year,
        time.time() + 2 * year,
        2**63 - 1,  # the largest integer an AMQP header can carry
    ]
    if node.env.broker == "redis":
        # JSON carries these; RabbitMQ cannot: AMQP has no integer this large, and
        # the broker closes the connection on a NaN or infinite double.
        malformed += [10**400, float("-inf"), float("inf"), float("nan")]
    before = node.scrape()
    producer = _foreign_producer(node.env.url)
    tags = [f"malformed-{i}" for i in range(len(malformed))]

    def run() -> None:
        try:
            for tag, stamp in zip(tags, malformed, strict=True):
                producer.send_task(
                    "outcomes.succeed", args=[tag], queue=node.queue, headers={PUBLISHED_AT: stamp}
                )
            producer.send_task(
                "outcomes.succeed",
                args=["well-formed"],
                queue=node.queue,
                headers={PUBLISHED_AT: time.time() - 5.0},
            )
        finally:
            producer.close()

    samples = node.counted({"succeeded": len(malformed) + 1}, run)
    for tag in [*tags, "well-formed"]:
        node.env.records.wait("done", tag)
    wait_sum = value(samples, "celery_bulkhead_queue_wait_seconds_sum")
    assert math.isfinite(wait_sum)
    # Every bad value really reached the worker, and was counted as such.
    assert value(samples, "celery_bulkhead_malformed_headers_total") == (
        value(before, "celery_bulkhead_malformed_headers_total") + len(malformed)
    )
    # Only the well-formed stamp was observed, and its wait is about five seconds.
    assert value(samples, "celery_bulkhead_queue_wait_seconds_count") == (
        value(before, "celery_bulkhead_queue_wait_seconds_count") + 1
    )
    waited = wait_sum - value(before, "celery_bulkhead_queue_wait_seconds_sum")
    assert 5.0 <= waited < 5.0 + SETTLE
