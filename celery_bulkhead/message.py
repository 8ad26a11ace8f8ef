"""The wire format: our header names, and accessors for Celery's task message.

Celery builds a ``task_message`` (``headers, properties, body,
sent_event``; protocol 2's body is ``(args, kwargs, embed)``) and hands it to
the publish path.  This module is the one place that knows that shape; the
rest of the package asks it for the headers, the embedded follow-ups or
whether a message belongs to a chord.  It imports nothing from the publish
path or the worker, so both sides read header names from here.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Any

__all__ = [
    "FOLLOW_UP",
    "PUBLISHED_AT",
    "arguments",
    "defer",
    "embed",
    "headers",
    "in_chord",
    "published_at",
]

#: Stamped on every pool publish: the publish time (epoch seconds), from which
#: workers measure queue wait.
PUBLISHED_AT = "bulkhead_published_at"
#: A publish that continues admitted work names its own task id here (or, on a
#: container with headers, the ids of all its tasks): never refused by a cap.
FOLLOW_UP = "bulkhead_follow_up"

#: Queue waits outside this range are not believed: a header from a clock far
#: off, or a hostile or corrupt value (one year).
_MAX_WAIT = 365 * 24 * 3600.0


def headers(message: Any) -> dict[str, Any]:
    """The message's headers (a dict Celery lets the publish path change)."""
    result: dict[str, Any] = message[0]
    return result


def embed(message: Any) -> dict[str, Any] | None:
    """The embedded follow-ups (``callbacks``, ``errbacks``, ``chain``, ``chord``), if any."""
    body = message[2]
    if isinstance(body, tuple) and len(body) == 3 and isinstance(body[2], dict):
        return body[2]
    return None


def arguments(message: Any) -> tuple[Any, Any]:
    """The task's positional and keyword arguments, as published."""
    body = message[2]
    if isinstance(body, tuple) and len(body) == 3:
        return body[0], body[1]
    return (), {}


def defer(message: Any, seconds: float) -> None:
    """Make the message due ``seconds`` from now (its ETA), unless it is due later already."""
    due = datetime.now(timezone.utc) + timedelta(seconds=seconds)
    current = headers(message).get("eta")
    if isinstance(current, str):
        try:
            existing = datetime.fromisoformat(current)
        except ValueError:
            existing = None
        if existing is not None and existing.tzinfo is not None and existing >= due:
            return
    headers(message)["eta"] = due.isoformat()


def in_chord(message: Any) -> bool:
    """Whether the message is a member of a chord's header."""
    if headers(message).get("chord"):
        return True
    extra = embed(message)
    return bool(extra and extra.get("chord"))


def published_at(value: Any, now: float) -> float | None:
    """The queue wait a ``PUBLISHED_AT`` header value stands for, or None if it is malformed.

    Header values come from whoever published the message: anything that is
    not a finite number of epoch seconds within a year of ``now`` (in either
    direction; a publisher's clock slightly ahead gives a wait of 0) is
    refused, so one bad message cannot poison a metric for good.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        wait = now - float(value)
    except OverflowError:
        return None
    if not math.isfinite(wait) or abs(wait) > _MAX_WAIT:
        return None
    return max(0.0, wait)
