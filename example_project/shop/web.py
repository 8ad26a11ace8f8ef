"""What the shop's web views call: publish a task, and degrade when a pool says no.

A bulkhead refuses work at publish time so that a sick pool shows up in the
web request as a clear answer instead of a queue that grows until the broker
falls over.  Each refusal is a ``Rejected`` error carrying its numbers, and the
page turns it into something a user can act on:

* ``PoolFull``: the pool's queue is at ``max_queue``; the workers are far behind;
* ``TenantLimited``: this tenant is over its rate (``retry_after`` seconds to wait);
* ``CircuitOpen``: the downstream is down and its breaker open (``retry_after``);
* a ``DroppedResult``: ``on_full="drop"`` chose to lose this one, on purpose;
* ``BrokerUnavailable``: the broker did not answer within ``bulkhead_publish_timeout``.

Each function returns a :class:`Reply`, which a Django or Flask view turns
into its HTTP response (``status``, and a ``Retry-After`` header when set).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from celery_bulkhead import BrokerUnavailable, CircuitOpen, DroppedResult, PoolFull, TenantLimited

from .reports import daily_sales
from .tasks import charge, deliver_webhook

__all__ = ["Reply", "checkout", "notify", "request_report"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    """An HTTP answer for the view: status, a message for the user, and Retry-After."""

    status: int
    message: str
    retry_after: int | None = None


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))


def checkout(order_id: int, amount_cents: int) -> Reply:
    """Queue the payment of an order; 503 when payments cannot take it now."""
    try:
        charge.delay(order_id, amount_cents)
    except PoolFull as full:
        # on_full="reject": nothing was sent.  The order stays unpaid and the
        # user is told now, instead of being charged an hour from now.
        logger.warning(
            "payments full (%s/%s): order %s not charged", full.depth, full.cap, order_id
        )
        return Reply(503, "Payments are busy. Your order is saved; please pay again shortly.", 30)
    except BrokerUnavailable:
        logger.exception("broker unavailable: order %s not charged", order_id)
        return Reply(503, "We cannot take payments right now; please try again shortly.", 30)
    return Reply(202, f"Order {order_id} is being paid.")


def notify(tenant_id: str, event: str, data: dict[str, Any]) -> Reply:
    """Queue a webhook to the tenant's receiver; a refusal never fails the caller's page."""
    try:
        result = deliver_webhook.delay(tenant_id=tenant_id, event=event, data=data)
    except TenantLimited as limited:
        # This tenant is over 10/s: the caller (an API client) should back off.
        return Reply(429, "Too many events for this account.", _seconds(limited.retry_after))
    except CircuitOpen as opened:
        # The receiver is down; queueing more would only pile up doomed calls.
        return Reply(503, "Webhook delivery is paused.", _seconds(opened.retry_after))
    if isinstance(result, DroppedResult):
        # on_full="drop": counted in celery_bulkhead_admissions_total and logged.
        return Reply(202, "Event accepted; its webhook was skipped (delivery backlog).")
    return Reply(202, "Event accepted.")


def request_report(day: str) -> Reply:
    """Queue a report; it may wait up to 5 s for room (``on_full="block"``), then 503."""
    try:
        daily_sales.delay(day)
    except PoolFull:
        return Reply(503, "Too many reports are being built; please try again later.", 60)
    return Reply(202, f"The report for {day} is being built.")
