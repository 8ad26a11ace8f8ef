"""The example shop (example_project/) imports, plans, runs and degrades as its README says.

It is what a team copies, so it is run the way they would run it: ``celery -A
shop ...`` in a subprocess from ``example_project/``, configured only by the
environment variables the example documents.  The end-to-end run uses Redis
database 11 and a queue prefix of its own (``SHOP_QUEUE_PREFIX``), and deletes
what it created.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support import ROOT, WORKER_FLAGS, wait_for

EXAMPLE = ROOT / "example_project"
#: The example's tests own this database; queues and results also carry a per-run prefix.
REDIS_URL = "redis://127.0.0.1:6379/11"
REGENERATE = "cd example_project && celery -A shop bulkhead plan --format procfile > Procfile"


def shop_env(**variables: str) -> dict[str, str]:
    """A clean environment: none of the caller's CELERY_* or SHOP_* settings leak in."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(EXAMPLE),
        **variables,
    }


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python <args>`` in example_project/, as a user would run it there."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=EXAMPLE,
        env=env or shop_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_example_plans_one_worker_per_pool_and_one_for_the_rest() -> None:
    result = run("-m", "celery", "-A", "shop", "bulkhead", "plan")
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert [line.split("--hostname ")[1].split()[0] for line in commands[:3]] == [
        "payments@%h",
        "webhooks@%h",
        "reports@%h",
    ]
    assert "--bulkhead-metrics-port 9808 --bulkhead-pool payments" in commands[0]
    assert "--pool threads" in commands[1]
    assert commands[3].startswith("celery -A shop worker --exclude-queues bulkhead.payments,")


def test_each_task_lands_in_the_pool_the_readme_says() -> None:
    """By decorator (charge, deliver_webhook), by name pattern (reports), or in none."""
    script = (
        "import json, shop.web\n"
        "from shop.celery import app, bulkhead\n"
        "names = sorted(n for n in app.tasks if n.startswith('shop.'))\n"
        "print(json.dumps({n: getattr(bulkhead.pool_for(n), 'name', None) for n in names}))\n"
    )
    result = run("-c", script)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "shop.reports.daily_sales": "reports",
        "shop.tasks.charge": "payments",
        "shop.tasks.deliver_webhook": "webhooks",
        "shop.tasks.send_receipt": None,
    }


def test_the_committed_procfile_is_the_plan_output() -> None:
    result = run("-m", "celery", "-A", "shop", "bulkhead", "plan", "--format", "procfile")
    assert result.returncode == 0, result.stderr
    committed = (EXAMPLE / "Procfile").read_text()
    assert committed == result.stdout, f"example_project/Procfile is stale; run: {REGENERATE}"


DEGRADE = """
import json
from dataclasses import asdict
from shop.celery import bulkhead
from shop.tasks import charge
from shop.web import checkout, notify

def show(step, reply):
    print(json.dumps({"step": step, **asdict(reply)}))

show("first order", checkout(1, 4999))
for order in range(2, 1001):  # the payments queue holds max_queue=1000: it is full now
    charge.delay(order, 100)
show("order 1001", checkout(1001, 4999))

for event in range(20):  # acme's burst of 20
    notify("acme", "order.paid", {"n": event})
show("acme's 21st event", notify("acme", "order.paid", {"n": 20}))
show("globex's first event", notify("globex", "order.paid", {"n": 0}))

circuit = bulkhead.circuit_of(bulkhead.pool("webhooks"))
for _ in range(5):  # the receiver failed fail_max times: the breaker opens
    circuit.after(None, RuntimeError("receiver down"))
show("breaker open", notify("globex", "order.paid", {"n": 1}))
"""


def test_web_degrades_when_a_pool_refuses() -> None:
    """A full pool, a tenant over its rate and an open breaker each become a reply, not a 500."""
    env = shop_env(CELERY_BROKER_URL="memory://", CELERY_RESULT_BACKEND="cache+memory://")
    result = run("-c", DEGRADE, env=env)
    assert result.returncode == 0, result.stderr
    replies = {row.pop("step"): row for row in map(json.loads, result.stdout.splitlines())}
    assert replies["first order"]["status"] == 202
    assert replies["order 1001"] == {
        "status": 503,
        "message": "Payments are busy. Your order is saved; please pay again shortly.",
        "retry_after": 30,
    }
    assert "payments full (1000/1000): order 1001 not charged" in result.stderr
    assert replies["acme's 21st event"]["status"] == 429
    assert replies["acme's 21st event"]["retry_after"] == 1  # 10/s: the next token is near
    assert replies["globex's first event"]["status"] == 202  # acme's limit is acme's alone
    assert replies["breaker open"]["status"] == 503
    assert 25 <= replies["breaker open"]["retry_after"] <= 30  # reset_timeout=30


# -- end to end, against Redis ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def redis_shop(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """The example's environment on Redis db 11 with its own queues; cleaned up after."""
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()  # a missing Redis fails here, loudly
    prefix = f"shoptest-{uuid.uuid4().hex[:8]}."
    env = shop_env(
        CELERY_BROKER_URL=REDIS_URL,
        SHOP_QUEUE_PREFIX=prefix,
        SHOP_METRICS_PORT=str(free_port()),
    )
    yield env, tmp_path
    ids = tmp_path / "task-ids"  # written by the publishing process
    results = (
        [f"celery-task-meta-{task}" for task in ids.read_text().split()] if ids.exists() else []
    )
    keys = [*client.scan_iter(match=f"*{prefix}*"), *results]
    if keys:
        client.delete(*keys)
    client.close()


PUBLISH = """
import sys
from shop.tasks import charge
result = charge.delay(7, 4999)
with open(sys.argv[1], "a") as ids:
    print(result.id, file=ids)
print(result.get(timeout=30))
"""


def test_a_payment_is_done_by_the_payments_worker(
    redis_shop: tuple[dict[str, str], Path],
) -> None:
    """``bulkhead worker --pool payments`` runs a charge; metrics and status show it."""
    env, tmp = redis_shop
    log_path = tmp / "worker.log"
    command = [sys.executable, "-m", "celery", "-A", "shop", "bulkhead", "worker"]
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [*command, "--pool", "payments", "--", *WORKER_FLAGS],
            cwd=EXAMPLE,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        published = run("-c", PUBLISH, str(tmp / "task-ids"), env=env)
        assert published.returncode == 0, published.stderr + log_path.read_text()
        assert published.stdout.strip() == "charged order 7: 4999 cents"

        url = f"http://127.0.0.1:{env['SHOP_METRICS_PORT']}/metrics"
        done = 'celery_bulkhead_tasks_total{outcome="succeeded",pool="payments"} 1.0'

        def scraped() -> bool:
            with urllib.request.urlopen(url, timeout=2) as response:
                return done in response.read().decode()

        wait_for(scraped, 10, "the payment in the payments worker's metrics")

        status = run(
            "-m", "celery", "-A", "shop", "bulkhead", "status", "--pool", "payments", env=env
        )
        assert status.returncode == 0, status.stdout + status.stderr
        row = status.stdout.splitlines()[1].split()
        assert row[:4] == [
            "payments",
            f"{env['SHOP_QUEUE_PREFIX']}bulkhead.payments",
            "0/1000",
            "1",
        ]

        worker.send_signal(signal.SIGTERM)  # drains within payments' drain_timeout
        assert worker.wait(timeout=40) == 0, log_path.read_text()
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
