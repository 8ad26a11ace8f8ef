"""``celery bulkhead check``: routes, pools and declared queues agree, or each mismatch is named."""

from __future__ import annotations

from tests.e2e.test_cli import celery


def test_a_clean_app_has_no_findings() -> None:
    """tests/app/shop.py: four pools, a legacy route outside them, every queue declared."""
    result = celery("-A", "tests.app.shop", "bulkhead", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "no findings: 4 pool(s); routes, pools and queues agree\n"


def test_a_tangled_app_gets_one_line_per_finding_and_exit_1() -> None:
    """tests/app/tangled.py makes each mistake once; the comments there name the finding."""
    result = celery("-A", "tests.app.tangled", "bulkhead", "check")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    found = {(line.split(": ")[0], line.split(": ")[1]) for line in lines}
    assert found == {
        ("error", "queue-not-declared"),
        ("error", "transport"),
        ("error", "state-url"),
        ("error", "route-into-pool"),
        ("error", "queue-overrides-pool"),
        ("warning", "shadowed-route"),
        ("warning", "route-into-pool"),
        ("warning", "empty-pool"),
    }
    assert len(lines) == 9
    expected = [
        "error: queue-not-declared: queue 'bulkhead.payments.continue' of pool 'payments' is not "
        "in task_queues",
        "error: transport: pool 'payments': invalid max_queue=100",
        "error: state-url: pool 'payments': invalid bulkhead_state_url=None",
        "error: route-into-pool: task 'tangled.audit' is in no pool, but task_routes sends it to "
        "queue 'bulkhead.payments' of pool 'payments'",
        "error: route-into-pool: task 'tangled.sneak' is in no pool, but its queue= option sends "
        "it to queue 'bulkhead.webhooks' of pool 'webhooks'",
        "error: queue-overrides-pool: task 'tangled.stray' is in pool 'webhooks', but its "
        "queue='elsewhere' option wins over the pool's router",
        "warning: shadowed-route: task 'tangled.notify' is in pool 'webhooks': its task_routes "
        "entry (queue 'bulkhead.payments' of pool 'payments') is never used",
        "warning: route-into-pool: task_routes entry 'reports.*' sends tasks to queue "
        "'bulkhead.payments' of pool 'payments' but matches no registered task",
        "warning: empty-pool: pool 'idle' has no registered task",
    ]
    for start in expected:
        assert any(line.startswith(start) for line in lines), start
    assert "tangled.legacy" not in result.stdout  # its own queue, outside every pool: fine
    assert "tangled.charge" not in result.stdout
    assert result.stderr.endswith("6 error(s), 3 warning(s)\n")


def test_a_task_naming_an_unknown_pool_is_a_finding() -> None:
    """tests/app/broken.py: a task module only workers import names pool 'oi'."""
    result = celery("-A", "tests.app.broken", "bulkhead", "check")
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "error: unknown-pool: task 'broken.fetch' (module tests.app.broken_tasks): "
        "invalid bulkhead='oi'; allowed: one of 'io' (unknown pool)",
        "warning: empty-pool: pool 'io' has no registered task (none with bulkhead='io', "
        "none matching its tasks= patterns)",
    ]


def test_an_app_without_a_bulkhead_is_a_finding() -> None:
    result = celery("-A", "tests.app.plain", "bulkhead", "check")
    assert result.returncode == 1
    assert result.stdout.startswith("error: no-bulkhead: invalid app='plain'")
