"""Example tasks, one for each way of putting a task in a pool.

The work is simulated with ``time.sleep`` so the example needs nothing but
Redis.
"""

from __future__ import annotations

import time
from typing import Any

from .celery import app, bulkhead


@app.task(bulkhead="payments")
def charge(order_id: int, amount_cents: int) -> str:
    """Charge an order. In the payments pool through the ``bulkhead`` option."""
    time.sleep(0.2)  # the payment provider's round trip
    return f"charged order {order_id}: {amount_cents} cents"


@bulkhead.task(pool="webhooks")
def deliver_webhook(url: str, payload: dict[str, Any], seconds: float = 0.5) -> str:
    """Deliver a webhook. In the webhooks pool through ``@bulkhead.task``.

    ``seconds`` stands in for how slow the receiving end is: send a batch with
    ``seconds=60`` to see payments keep running while webhooks are stuck.
    """
    time.sleep(seconds)
    return f"delivered {len(payload)} fields to {url}"


@app.task(name="reports.daily_sales")
def daily_sales(day: str) -> str:
    """Build a report. In the reports pool because its name matches ``reports.*``."""
    time.sleep(5)
    return f"sales report for {day}"


@app.task
def send_receipt(order_id: int) -> str:
    """Email a receipt. In no pool: Celery's normal routing (the ``celery`` queue)."""
    return f"receipt for order {order_id} sent"
