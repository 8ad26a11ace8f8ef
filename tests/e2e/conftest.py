"""Fixtures: real brokers, real ``celery bulkhead worker`` processes.

Every test session gets its own queue-name prefix; queues are deleted at the
end.  Brokers are expected on loopback (CI starts them); a missing broker is a
test failure, never a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection

from tests.app.capped import make_capped_app
from tests.app.shop import RECORDS_URL, make_app
from tests.support import BROKERS, ROOT, WORKER_FLAGS, wait_for

__all__ = ["BROKERS", "ROOT", "Env", "wait_for"]


@dataclass
class Records:
    """What the test app's tasks reported, read from the Redis list ``<prefix>:log``."""

    client: redis.Redis
    key: str
    seen: list[dict[str, Any]] = field(default_factory=list)

    def refresh(self) -> list[dict[str, Any]]:
        raw = self.client.lrange(self.key, len(self.seen), -1)
        self.seen.extend(json.loads(item) for item in raw)
        return self.seen

    def find(self, event: str, tag: str) -> list[dict[str, Any]]:
        return [r for r in self.refresh() if r["event"] == event and r.get("tag") == tag]

    def wait(
        self, event: str, tag: str, timeout: float = 30.0, count: int = 1
    ) -> list[dict[str, Any]]:
        return wait_for(
            lambda: (found := self.find(event, tag)) and len(found) >= count and found,
            timeout,
            f"{count} {event!r} record(s) for tag {tag!r}",
        )


@dataclass
class WorkerProcess:
    """A running ``celery ... bulkhead worker`` (or plain ``worker``) process."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


@dataclass
class Env:
    """One broker, one prefix: the app, the records and a way to start workers."""

    broker: str
    url: str
    prefix: str
    app: Celery
    records: Records
    tmp: Path
    module: str = "tests.app.shop"
    workers: list[WorkerProcess] = field(default_factory=list)

    def start(
        self, *args: str, bulkhead: bool = True, extra_env: dict[str, str] | None = None
    ) -> WorkerProcess:
        """Start ``celery -A <module> bulkhead worker <args>`` (or a plain worker)."""
        env = {
            **os.environ,
            "BULKHEAD_TEST_BROKER": self.url,
            "BULKHEAD_TEST_PREFIX": self.prefix,
            "PYTHONPATH": str(ROOT),
            **(extra_env or {}),
        }
        command = [sys.executable, "-m", "celery", "-A", self.module]
        if bulkhead:
            command += ["bulkhead", "worker", *args, "--", *WORKER_FLAGS]
        else:
            command += ["worker", *args, *WORKER_FLAGS]
        log_path = self.tmp / f"worker-{len(self.workers)}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProcess(process, log_path)
        self.workers.append(worker)
        return worker

    def release(self, key: str, n: int = 1) -> None:
        self.records.client.rpush(key, *["go"] * n)

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}:{uuid.uuid4().hex[:8]}"

    def take(self, queue: str) -> bool:
        """Remove one ready message from ``queue``, as a consumer would; False if empty."""
        with Connection(self.url) as conn, conn.channel() as channel:
            return channel.basic_get(queue, no_ack=True) is not None

    def ready_messages(self, queue: str) -> int:
        """Ready messages in ``queue`` as the broker counts them (0 when it does not exist)."""
        with Connection(self.url) as conn, conn.channel() as channel:
            try:
                return int(channel.queue_declare(queue=queue, passive=True).message_count)
            except conn.channel_errors:
                return 0


@pytest.fixture(scope="session")
def session_prefix() -> str:
    return f"bht{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def records_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(RECORDS_URL)
    client.ping()  # a missing Redis fails here, loudly
    yield client
    client.close()


def _cleanup(url: str, prefix: str, app: Celery) -> None:
    queues = [q.name for q in app.amqp.queues.values() if q.name.startswith(prefix)]
    with Connection(url) as conn:
        for name in queues:
            with conn.channel() as channel, contextlib.suppress(conn.channel_errors):
                channel.queue_delete(name)
            if url.startswith("amqp"):
                with conn.channel() as channel, contextlib.suppress(conn.channel_errors):
                    channel.exchange_delete(name)


def _environment(
    request: pytest.FixtureRequest,
    broker: str,
    session_prefix: str,
    records_client: redis.Redis,
    tmp_path: Path,
    make: Callable[[str, str], Celery],
    module: str,
) -> Iterator[Env]:
    url = BROKERS[broker]
    prefix = f"{session_prefix}-{broker}-{uuid.uuid4().hex[:6]}"
    app = make(url, prefix)
    with Connection(url) as conn:
        conn.ensure_connection(max_retries=1)  # a missing broker fails here
    records = Records(records_client, f"{prefix}:log")
    environment = Env(broker, url, prefix, app, records, tmp_path, module)
    yield environment
    for worker in environment.workers:
        worker.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for i, worker in enumerate(environment.workers):
            sys.stderr.write(f"\n--- worker {i} log ---\n{worker.log()[-6000:]}\n")
    _cleanup(url, prefix, app)
    keys = list(records_client.scan_iter(match=f"{prefix}:*"))
    if keys:
        records_client.delete(*keys)


@pytest.fixture(params=sorted(BROKERS))
def env(
    request: pytest.FixtureRequest,
    session_prefix: str,
    records_client: redis.Redis,
    tmp_path: Path,
) -> Iterator[Env]:
    """The shop app (tests/app/shop.py) on each broker."""
    yield from _environment(
        request,
        request.param,
        session_prefix,
        records_client,
        tmp_path,
        make_app,
        "tests.app.shop",
    )


@pytest.fixture
def redis_shop(
    request: pytest.FixtureRequest,
    session_prefix: str,
    records_client: redis.Redis,
    tmp_path: Path,
) -> Iterator[Env]:
    """The shop app on Redis only, for Redis-specific behaviour."""
    yield from _environment(
        request, "redis", session_prefix, records_client, tmp_path, make_app, "tests.app.shop"
    )


@pytest.fixture(params=sorted(BROKERS))
def capped(
    request: pytest.FixtureRequest,
    session_prefix: str,
    records_client: redis.Redis,
    tmp_path: Path,
) -> Iterator[Env]:
    """The admission app (tests/app/capped.py) on each broker."""
    yield from _environment(
        request,
        request.param,
        session_prefix,
        records_client,
        tmp_path,
        make_capped_app,
        "tests.app.capped",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
