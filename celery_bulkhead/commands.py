"""Per-pool ``celery worker`` command lines, shared by ``bulkhead worker`` and ``plan``."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from .pool import Pool
from .routing import consumed_queues

__all__ = ["default_worker_argv", "pool_worker_argv", "shell_line"]


def pool_worker_argv(
    pool: Pool,
    app: str | None,
    extra: Sequence[str] = (),
    *,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> list[str]:
    """Arguments after ``celery`` that run one node for ``pool``."""
    argv = ["-A", app] if app else []
    argv += [
        "worker",
        "--queues",
        ",".join(consumed_queues(pool)),
        "--concurrency",
        str(pool.concurrency),
        "--hostname",
        f"{pool.name}@%h",
        "--pool",
        pool.worker_pool,
        "--prefetch-multiplier",
        str(pool.prefetch_multiplier),
    ]
    if pool.time_limit is not None:
        argv += ["--time-limit", _seconds(pool.time_limit)]
    if pool.soft_time_limit is not None:
        argv += ["--soft-time-limit", _seconds(pool.soft_time_limit)]
    if metrics_port is not None:
        argv += ["--bulkhead-metrics-port", str(metrics_port)]
        if metrics_host != "127.0.0.1":
            argv += ["--bulkhead-metrics-host", metrics_host]
    argv += ["--bulkhead-pool", pool.name, *extra]
    return argv


def default_worker_argv(pools: Sequence[Pool], app: str | None) -> list[str]:
    """Arguments for a worker serving every queue except the pools' (tasks in no pool)."""
    argv = ["-A", app] if app else []
    excluded = [name for pool in pools for name in consumed_queues(pool)]
    return [*argv, "worker", "--exclude-queues", ",".join(excluded)]


def shell_line(argv: Sequence[str], program: str = "celery") -> str:
    return " ".join(shlex.quote(part) for part in (program, *argv))


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
