"""The producer: sends one pool's share of the workload on time, notes what admission said."""

from __future__ import annotations

import threading
import time
from typing import Any

from .measure import Sent
from .story import TASKS, DemoConfig, Submission

__all__ = ["produce", "publish"]


def publish(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Publish one task; the outcome: sent, rejected, dropped, throttled or error."""
    from celery_bulkhead import CircuitOpen, PoolFull, TenantLimited

    try:
        result = task.apply_async(args, kwargs)
    except TenantLimited:
        return "throttled"
    except (PoolFull, CircuitOpen):
        return "rejected"
    except Exception:
        return "error"
    if getattr(result, "dropped", False):
        return "throttled" if isinstance(result.error, TenantLimited) else "dropped"
    return "sent"


def produce(
    app: Any,
    config: DemoConfig,
    plan: list[Submission],
    start: float,
    out: list[Sent],
    stop: threading.Event,
) -> None:
    """Send one pool's share of the workload on time (one thread per pool)."""
    for sub in plan:
        delay = start + sub.at - time.time()
        if (delay > 0 and stop.wait(delay)) or stop.is_set():
            return
        task = app.tasks[TASKS[sub.pool]]
        kwargs = {"tenant": config.tenant_id(sub.tenant)} if sub.tenant else {}
        submitted = time.time()
        outcome = publish(task, (sub.seq, submitted), kwargs)
        out.append(Sent(sub.pool, sub.seq, sub.tenant, submitted, outcome))
