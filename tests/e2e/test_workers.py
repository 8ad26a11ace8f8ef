"""End to end: real brokers, real ``celery -A app bulkhead worker`` processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import ROOT, Env, wait_for

HOST = socket.gethostname()


def warm_up(env: Env, *tasks: str) -> None:
    """Send one task per named task and wait until each ran: the pools are up."""
    for name in tasks:
        env.app.send_task(name, args=[f"warm-{name}"])
    for name in tasks:
        env.records.wait("done", f"warm-{name}", timeout=60)


def test_each_pool_runs_its_tasks_on_its_own_named_worker(env: Env) -> None:
    """Decorator, bulkhead.task, name pattern and send_task by name all reach the pool's node."""
    env.start()
    plain = env.start(
        "--queues",
        f"{env.prefix}.default,{env.prefix}.legacy",
        "--hostname",
        "plain@%h",
        "--pool",
        "threads",
        bulkhead=False,
    )
    app = env.app
    app.tasks["shop.echo"].delay("by-decorator")
    app.tasks["shop.via_bulkhead_decorator"].delay("by-bulkhead-task")
    app.tasks["shop.reports.daily"].apply_async(args=["by-pattern"])
    app.send_task("shop.echo", args=["by-send-task"])
    app.send_task("shop.where", args=["prefork-pool"])
    app.tasks["legacy.cleanup"].delay("apps-own-route")
    app.tasks["shop.unpooled"].delay("no-pool")

    expected = {
        "by-decorator": ("fast", f"{env.prefix}.fast"),
        "by-bulkhead-task": ("fast", f"{env.prefix}.fast"),
        "by-pattern": ("slow", f"{env.prefix}.slow"),
        "by-send-task": ("fast", f"{env.prefix}.fast"),
        "prefork-pool": ("cpu", f"{env.prefix}.cpu"),
        "apps-own-route": ("plain", f"{env.prefix}.legacy"),
        "no-pool": ("plain", f"{env.prefix}.default"),
    }
    for tag, (node, queue) in expected.items():
        (record,) = env.records.wait("done", tag, timeout=60)
        assert record["hostname"] == f"{node}@{HOST}", tag
        assert record["routing_key"] == queue, tag
    assert plain.process.poll() is None


def test_inspect_stats_shows_each_nodes_pool(env: Env) -> None:
    """`celery inspect stats` (and so Flower) shows which pool a node serves."""
    env.start("--pool", "cpu", "--pool", "fast")
    warm_up(env, "shop.where", "shop.echo")
    stats = wait_for(
        lambda: (
            (s := env.app.control.inspect(timeout=2).stats() or {})
            and {f"cpu@{HOST}", f"fast@{HOST}"} <= set(s)
            and s
        ),
        30,
        "both nodes to answer inspect stats",
    )
    cpu = stats[f"cpu@{HOST}"]
    assert cpu["bulkhead"]["pool"] == "cpu"
    assert cpu["bulkhead"]["queue"] == f"{env.prefix}.cpu"
    assert cpu["pool"]["max-concurrency"] == 2
    assert cpu["pool"]["timeouts"] == [200.0, 300.0]
    assert cpu["prefetch_count"] == 2  # prefetch_multiplier 1 x concurrency 2
    assert stats[f"fast@{HOST}"]["bulkhead"]["pool"] == "fast"


def test_a_hung_pool_does_not_delay_another_pools_tasks(env: Env) -> None:
    """Every slot of 'slow' hangs on a dead downstream; 'fast' tasks still finish promptly."""
    env.start("--pool", "fast", "--pool", "slow")
    warm_up(env, "shop.echo", "shop.reports.daily")
    release = env.key("release")
    for i in range(6):  # 3x the slow pool's concurrency: its queue backs up too
        env.app.tasks["shop.hang"].delay(f"hang-{i}", release)
    env.records.wait("started", "hang-0")
    env.records.wait("started", "hang-1")

    latencies = []
    for i in range(20):
        submitted = time.time()
        env.app.tasks["shop.echo"].delay(f"fast-{i}", submitted)
        (record,) = env.records.wait("done", f"fast-{i}", timeout=30)
        latencies.append(record["at"] - submitted)
    # The hung tasks are still hanging: the fast pool really ran beside them.
    assert not any(env.records.find("done", f"hang-{i}") for i in range(6))
    assert env.ready_messages(f"{env.prefix}.slow") == 4
    # Plain Celery on one queue would make these wait for the hang timeout (60 s);
    # a generous margin keeps a loaded CI machine from flaking.
    assert max(latencies) < 2.0, latencies
    env.release(release, 6)
    for i in range(6):
        env.records.wait("done", f"hang-{i}", timeout=30)


def test_sigterm_drains_a_task_in_flight_and_loses_nothing(env: Env) -> None:
    """SIGTERM while a task runs: it finishes (acks_late), the worker exits 0, no redelivery."""
    worker = env.start("--pool", "fast")
    warm_up(env, "shop.echo")
    release = env.key("release")
    env.app.tasks["shop.work"].delay("in-flight", release)
    env.records.wait("started", "in-flight")
    worker.signal(signal.SIGTERM)
    wait_for(lambda: "draining pool 'fast'" in worker.log(), 20, "the drain to start")
    env.release(release)  # the task finishes during the drain
    assert worker.wait(timeout=30) == 0
    (done,) = env.records.wait("done", "in-flight")
    assert not done["redelivered"]
    assert len(env.records.find("started", "in-flight")) == 1
    assert env.ready_messages(f"{env.prefix}.fast") == 0


@pytest.mark.parametrize(
    ("pool", "task", "warm"),
    [("slow", "shop.hang", "shop.reports.daily"), ("cpu", "shop.cpu_hang", "shop.where")],
    ids=["threads", "prefork"],
)
def test_a_task_outliving_drain_timeout_is_stopped_hard_and_redelivered(
    env: Env, pool: str, task: str, warm: str
) -> None:
    """Past drain_timeout the worker is stopped hard; the task comes back, not lost."""
    worker = env.start("--pool", pool)
    warm_up(env, warm)
    release = env.key("release")
    env.app.tasks[task].delay("outlives-drain", release, 120)
    env.records.wait("started", "outlives-drain")
    stopped_at = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 1  # 1: a pool had to be stopped hard
    # drain_timeout is 1.5 s; the cold shutdown after it is quick.
    assert time.monotonic() - stopped_at < 20
    assert "did not drain in time" in worker.log()
    assert not env.records.find("done", "outlives-drain")

    env.release(release)
    env.start("--pool", pool)
    records = env.records.wait("started", "outlives-drain", count=2, timeout=60)
    assert len({r["id"] for r in records}) == 1  # the same message, delivered again
    env.records.wait("done", "outlives-drain", timeout=30)


def test_a_crashed_pool_worker_is_restarted(env: Env) -> None:
    """kill -9 of one pool's worker: the supervisor starts it again; the other pool is untouched."""
    supervisor = env.start("--pool", "fast", "--pool", "slow")
    warm_up(env, "shop.echo", "shop.reports.daily")
    (first,) = env.records.find("done", "warm-shop.echo")
    os.kill(first["pid"], signal.SIGKILL)  # threads pool: the task ran in the worker's process
    wait_for(lambda: "exited unexpectedly" in supervisor.log(), 20, "the crash to be noticed")
    env.app.tasks["shop.echo"].delay("after-crash")
    (record,) = env.records.wait("done", "after-crash", timeout=60)
    assert record["pid"] != first["pid"]
    assert record["hostname"] == f"fast@{HOST}"
    env.app.tasks["shop.reports.daily"].delay("other-pool")
    env.records.wait("done", "other-pool")
    assert supervisor.process.poll() is None


def test_pool_option_runs_only_the_named_pools(env: Env) -> None:
    """`bulkhead worker --pool fast` consumes the fast queue only."""
    env.start("--pool", "fast")
    env.app.tasks["shop.reports.daily"].delay("not-served")
    warm_up(env, "shop.echo")
    wait_for(lambda: env.ready_messages(f"{env.prefix}.slow") == 1, 10, "the slow task to queue")
    assert not env.records.find("done", "not-served")


def test_status_shows_depth_consumers_and_fails_for_a_pool_without_consumers(env: Env) -> None:
    env.start("--pool", "fast")
    warm_up(env, "shop.echo")
    env.app.tasks["shop.reports.daily"].delay("waiting")  # the slow pool has no worker
    wait_for(lambda: env.ready_messages(f"{env.prefix}.slow") == 1, 10, "the slow task to queue")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.app.shop",
            "bulkhead",
            "status",
            "--pool",
            "fast",
            "--pool",
            "slow",
            "--json",
            "--timeout",
            "3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "BULKHEAD_TEST_BROKER": env.url, "BULKHEAD_TEST_PREFIX": env.prefix},
    )
    assert result.returncode == 1
    assert "no consumer for pool(s): slow" in result.stderr
    fast, slow = json.loads(result.stdout)
    assert fast["consumers"] == [f"fast@{HOST}"] and fast["depth"] == 0
    assert slow["consumers"] == [] and slow["depth"] == 1
