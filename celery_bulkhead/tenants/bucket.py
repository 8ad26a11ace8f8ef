"""The token bucket as GCRA: a pure function of a stored time and ``now``.

GCRA (the generic cell rate algorithm) keeps one number per tenant, the
*theoretical arrival time* ``tat``: when the bucket would be full again if
nothing else arrived.  A request costs one ``interval`` (``1 / rate``); it
is allowed while ``tat`` is no further than ``burst`` intervals ahead of
``now``.  The same function runs in Python (the memory store) and, line for
line, in ``lua/bucket.lua`` (the Redis store); one contract test suite keeps
them equal.

``horizon`` turns a refusal into a reservation: a request that would be
allowed within ``horizon`` seconds takes its future slot now and is told how
long to wait (``on_limited="defer"``), so deferred work is spaced at the
rate instead of returning in one wave.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Take", "take"]


@dataclass(frozen=True)
class Take:
    """The answer of :func:`take`.

    ``allowed``: the request may go (now, or after ``wait`` seconds when it
    was reserved); ``tat``: the value to store (unchanged when refused);
    ``wait``: seconds until the request may run (0 when allowed now; when
    refused, the time until it would be allowed: ``retry_after``).
    """

    allowed: bool
    tat: float
    wait: float


def take(tat: float | None, now: float, interval: float, burst: int, horizon: float = 0.0) -> Take:
    """One request against a bucket whose stored arrival time is ``tat`` (None: full).

    Args:
        tat: the stored theoretical arrival time, or None for a new tenant.
        now: the current time, in the same unit (seconds).
        interval: seconds one request costs (``1 / rate``).
        burst: requests allowed at once from a full bucket (>= 1).
        horizon: seconds a request may be reserved ahead (0: never reserve).
    """
    base = now if tat is None or tat < now else tat
    new_tat = base + interval
    # (base - now) first: a fresh bucket's wait is exactly -(burst - 1) * interval,
    # with no rounding error that could refuse its very first request.
    wait = (base - now) - (burst - 1) * interval
    if wait <= 0:
        return Take(True, new_tat, 0.0)
    if wait <= horizon:
        return Take(True, new_tat, wait)
    return Take(False, now if tat is None else tat, wait)
