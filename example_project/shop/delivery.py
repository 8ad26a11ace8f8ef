"""POST a webhook with urllib, and say whose fault a failure is.

The breaker on the webhooks pool must open when the *receiver* is down, not
when the shop sends something the receiver refuses.  So a failure is split in
two: :class:`ReceiverRefused` (a 4xx: our request is wrong, retrying or
pausing the fleet would not help) and :class:`ReceiverFailed` (a 5xx, a
timeout, a refused connection: the downstream is sick).  The settings list
``ReceiverRefused`` in the breaker's ``exclude``.

This module imports nothing from the app, so ``shop.settings`` can import it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

__all__ = ["ReceiverFailed", "ReceiverRefused", "post_json"]

#: 4xx statuses that mean "the receiver is overloaded", not "your request is
#: wrong": they count against the breaker and are retried like a 5xx.
_OVERLOADED = frozenset({408, 425, 429})


class ReceiverRefused(Exception):
    """The receiver answered 4xx: the request is wrong. Not retried, not a breaker failure."""

    def __init__(self, url: str, status: int) -> None:
        super().__init__(url, status)
        self.url = url
        self.status = status

    def __str__(self) -> str:
        return f"{self.url} refused the webhook with HTTP {self.status}"


class ReceiverFailed(Exception):
    """The receiver is down, slow or broken (5xx, timeout, no connection). Retried."""


def post_json(url: str, body: Mapping[str, Any], *, timeout: float) -> int:
    """POST ``body`` as JSON to ``url``; the HTTP status of a 2xx/3xx answer.

    Raises:
        ReceiverRefused: on a 4xx other than 408, 425 and 429.
        ReceiverFailed: on any other error status, a timeout or a network error.
    """
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "shop-webhooks/1"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:  # before URLError: it is one
        if 400 <= exc.code < 500 and exc.code not in _OVERLOADED:
            raise ReceiverRefused(url, exc.code) from exc
        raise ReceiverFailed(f"{url} answered HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:  # refused, reset, DNS, timeout
        raise ReceiverFailed(f"{url}: {exc}") from exc
