"""``celery bulkhead status`` end to end: exact in-flight counts, and a broker that is not there."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.app.prefixed import make_prefixed_app
from tests.e2e.conftest import BROKERS, ROOT, Env, _environment

HOST = socket.gethostname()
#: Seconds `status` may take beyond its --timeout: interpreter start, imports, one connect.
SLACK = 3.0


def status(
    url: str, prefix: str, *args: str, module: str = "tests.app.shop"
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``celery -A module bulkhead status *args``; the result and how long it took."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", module, "bulkhead", "status", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "BULKHEAD_TEST_BROKER": url, "BULKHEAD_TEST_PREFIX": prefix},
    )
    return result, time.monotonic() - started


@pytest.fixture(params=sorted(BROKERS))
def prefixed(
    request: pytest.FixtureRequest,
    session_prefix: str,
    records_client: redis.Redis,
    tmp_path: Path,
) -> Iterator[Env]:
    """The app of tests/app/prefixed.py (queues ``.pay`` and ``.payments``) on each broker."""
    yield from _environment(
        request,
        request.param,
        session_prefix,
        records_client,
        tmp_path,
        make_prefixed_app,
        "tests.app.prefixed",
    )


def test_in_flight_counts_only_the_pools_own_queue_on_a_node_serving_both(prefixed: Env) -> None:
    """A task from ``.payments`` running on a node that also serves ``.pay`` is not pay's."""
    env = prefixed
    env.start(
        "--queues",
        f"{env.prefix}.pay,{env.prefix}.payments",
        "--hostname",
        "both@%h",
        "--pool",
        "threads",
        "--concurrency",
        "2",
        bulkhead=False,
    )
    env.app.tasks["prefixed.echo"].delay("warm")
    env.records.wait("done", "warm", timeout=60)
    release = env.key("release")
    env.app.tasks["prefixed.hang"].delay("held", release)
    env.records.wait("started", "held")
    try:
        result, _ = status(
            env.url, env.prefix, "--json", "--timeout", "3", module="tests.app.prefixed"
        )
    finally:
        env.release(release)
    assert result.returncode == 0, result.stderr
    pay, payments = json.loads(result.stdout)
    assert pay["consumers"] == payments["consumers"] == [f"both@{HOST}"]
    assert (pay["pool"], pay["inflight"]) == ("pay", 0)
    assert (payments["pool"], payments["inflight"]) == ("payments", 1)
    env.records.wait("done", "held")  # released: nothing is left running at teardown


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but never listening: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never answers: a frozen broker."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


DEAD_BROKERS = {
    "redis": "redis://:s3cret-pw@127.0.0.1:{port}/9",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:{port}//",
}
PASSWORDS = {"redis": ":s3cret-pw@", "rabbitmq": "guest:guest"}


@pytest.mark.parametrize("broker", sorted(DEAD_BROKERS))
def test_status_without_a_broker_shows_what_it_knows_and_exits_2(
    broker: str, closed_port: int
) -> None:
    """Pools and caps are shown, depth/consumers/in-flight are ``?``, within --timeout."""
    url = DEAD_BROKERS[broker].format(port=closed_port)
    result, elapsed = status(url, "st", "--timeout", "1")
    assert result.returncode == 2, result.stderr
    assert elapsed < 1 + SLACK, f"took {elapsed:.1f}s"
    assert "Traceback" not in result.stderr
    assert PASSWORDS[broker] not in result.stdout + result.stderr
    assert f"broker unreachable at {broker.replace('rabbitmq', 'amqp')}://" in result.stderr
    assert f"127.0.0.1:{closed_port}" in result.stderr
    assert "(depth, consumers and in-flight unknown)" in result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert rows == [
        ["fast", "st.fast", "?/-", "?", "?"],
        ["slow", "st.slow", "?/-", "?", "?"],
        ["cpu", "st.cpu", "?/-", "?", "?"],
        ["metered", "st.metered", "?/1000", "?", "?"],
    ]


@pytest.mark.parametrize("broker", sorted(DEAD_BROKERS))
def test_status_json_without_a_broker_has_nulls_for_the_unknowns(
    broker: str, closed_port: int
) -> None:
    url = DEAD_BROKERS[broker].format(port=closed_port)
    result, elapsed = status(url, "st", "--json", "--timeout", "1", "--pool", "metered")
    assert result.returncode == 2, result.stderr
    assert elapsed < 1 + SLACK, f"took {elapsed:.1f}s"
    assert "broker unreachable at " in result.stderr
    assert PASSWORDS[broker] not in result.stdout + result.stderr
    assert json.loads(result.stdout) == [
        {
            "pool": "metered",
            "queue": "st.metered",
            "depth": None,
            "cap": 1000,
            "consumers": None,
            "inflight": None,
            "concurrency": 4,
        }
    ]


@pytest.mark.parametrize("broker", sorted(DEAD_BROKERS))
def test_status_gives_up_on_a_frozen_broker_within_its_timeout(
    broker: str, silent_port: int
) -> None:
    """A broker that accepts the connection but never answers costs --timeout, not minutes."""
    url = DEAD_BROKERS[broker].format(port=silent_port)
    result, elapsed = status(url, "st", "--json", "--timeout", "1")
    assert result.returncode == 2, result.stderr
    assert elapsed < 1 + SLACK, f"took {elapsed:.1f}s"
    assert "broker unreachable at " in result.stderr
    assert all(row["depth"] is None for row in json.loads(result.stdout))
