"""The ``celery bulkhead`` subcommand: plans and clear errors."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT


def celery(*args: str, prefix: str = "cli") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "BULKHEAD_TEST_PREFIX": prefix},
    )


def test_plan_prints_one_worker_command_per_pool_and_one_for_the_rest() -> None:
    result = celery("-A", "tests.app.shop", "bulkhead", "plan")
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert commands == [
        "celery -A tests.app.shop worker --queues cli.fast --concurrency 2 --hostname fast@%h "
        "--pool threads --prefetch-multiplier 1 --bulkhead-pool fast",
        "celery -A tests.app.shop worker --queues cli.slow --concurrency 2 --hostname slow@%h "
        "--pool threads --prefetch-multiplier 1 --bulkhead-pool slow",
        "celery -A tests.app.shop worker --queues cli.cpu --concurrency 2 --hostname cpu@%h "
        "--pool prefork --prefetch-multiplier 1 --time-limit 300 --soft-time-limit 200 "
        "--bulkhead-pool cpu",
        "celery -A tests.app.shop worker --queues cli.metered,cli.metered.continue "
        "--concurrency 4 --hostname metered@%h --pool prefork --prefetch-multiplier 1 "
        "--bulkhead-pool metered",
        "celery -A tests.app.shop worker --exclude-queues "
        "cli.fast,cli.slow,cli.cpu,cli.metered,cli.metered.continue",
    ]


def test_plan_procfile_for_selected_pools() -> None:
    result = celery(
        "-A", "tests.app.shop", "bulkhead", "plan", "--format", "procfile", "--pool", "slow"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "slow: celery -A tests.app.shop worker --queues cli.slow --concurrency 2 "
        "--hostname slow@%h --pool threads --prefetch-multiplier 1 --bulkhead-pool slow"
    ]


def test_unknown_pool_option_is_a_usage_error_listing_the_pools() -> None:
    for command in ("plan", "worker"):
        result = celery("-A", "tests.app.shop", "bulkhead", command, "--pool", "nope")
        assert result.returncode == 2
        assert (
            "invalid pool='nope'; allowed: one of 'fast', 'slow', 'cpu', 'metered'" in result.stderr
        )


def test_worker_refuses_to_start_when_a_worker_only_module_names_an_unknown_pool() -> None:
    """A typo in a module only workers import fails at once, naming the task and its module."""
    result = celery("-A", "tests.app.broken", "bulkhead", "worker")
    assert result.returncode == 2
    assert (
        "Error: task 'broken.fetch' (module tests.app.broken_tasks): "
        "invalid bulkhead='oi'; allowed: one of 'io' (unknown pool)\n"
    ) in result.stderr


def test_a_misspelt_pool_in_a_decorator_names_the_task_and_suggests_the_pool() -> None:
    """``@app.task(bulkhead="paymnets")`` in an included module: plan and worker say where."""
    for command in ("plan", "worker"):
        result = celery("-A", "tests.app.broken_decorated", "bulkhead", command)
        assert result.returncode == 2, result.stderr
        assert (
            "Error: task 'tests.app.broken_decorated_tasks.charge' "
            "(module tests.app.broken_decorated_tasks): invalid bulkhead='paymnets'; "
            "allowed: one of 'payments', 'reports' (unknown pool; did you mean 'payments'?)\n"
        ) in result.stderr
        assert "Traceback" not in result.stderr


def test_an_app_without_a_bulkhead_is_a_clear_error() -> None:
    result = celery("-A", "tests.app.plain", "bulkhead", "plan")
    assert result.returncode == 2
    assert "an app with Bulkhead(app, ...) declared" in result.stderr


def test_plan_for_a_capped_pool_consumes_its_continuation_queue() -> None:
    result = celery("-A", "tests.app.capped", "bulkhead", "plan", "--pool", "retrier")
    assert result.returncode == 0, result.stderr
    assert "--queues cli.retrier,cli.retrier.continue " in result.stdout
