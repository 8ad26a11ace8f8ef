"""The shop's tasks: two ways of putting a task in a pool, and one task in none.

The reports are in ``shop/reports.py``, put in their pool by name pattern.
Payments are simulated with ``time.sleep``; webhooks are real HTTP POSTs
(to ``receiver.py`` by default).
"""

from __future__ import annotations

import time
from typing import Any

from .celery import app, bulkhead
from .delivery import ReceiverFailed, post_json


@app.task(bulkhead="payments")
def charge(order_id: int, amount_cents: int) -> str:
    """Charge an order. In the payments pool through the ``bulkhead`` task option."""
    time.sleep(0.2)  # the payment provider's round trip
    return f"charged order {order_id}: {amount_cents} cents"


@bulkhead.task(
    pool="webhooks",
    # A sick receiver gets retried with backoff; a 4xx (ReceiverRefused) does not.
    autoretry_for=(ReceiverFailed,),
    retry_backoff=5,
    retry_backoff_max=300,
    max_retries=5,
)
def deliver_webhook(*, tenant_id: str, event: str, data: dict[str, Any]) -> int:
    """POST one event to the webhook receiver. In the webhooks pool through ``@bulkhead.task``.

    Keyword-only: the pool's tenant limit reads ``tenant_id`` from the call's
    keyword arguments.  Returns the receiver's HTTP status.
    """
    body = {"tenant": tenant_id, "event": event, "data": data}
    return post_json(app.conf.shop_webhook_url, body, timeout=app.conf.shop_webhook_timeout)


@app.task
def send_receipt(order_id: int) -> str:
    """Email a receipt. In no pool: Celery's normal routing (the ``celery`` queue)."""
    return f"receipt for order {order_id} sent"
