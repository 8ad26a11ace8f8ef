"""The breaker's transitions: pure functions of a record and ``now`` (milliseconds).

The same state machine as pybreaker's (closed → open → half-open → closed
or open again), made for a fleet: the record is shared, every transition is
one atomic step (``lua/breaker.lua`` on Redis, this module under a lock in
memory), and half-open trials are leases, so at most ``max_trials`` run at
once however many processes reach the reset time together.

Two choices differ from pybreaker, both so that a closed breaker costs
nothing per task: a success does not reset the failure count (that would be
a Redis call per task); instead the breaker opens when ``fail_max`` failures
fall within ``window`` milliseconds.  And a process learns the state from a
short-lived cache (see :class:`celery_bulkhead.breaker.Circuit`).

Opt-in, a sliding window of call counts (Resilience4j's vocabulary): the
window is :data:`BUCKETS` time buckets of ``bucket`` ms each, and the
breaker also opens when, over the buckets still in the window, failures /
calls or slow calls / calls reaches its threshold with at least
``minimum_calls`` calls.  Processes count their calls locally and report
them in batches (:class:`Calls`); a batch lands in the bucket of the time it
is reported.  Counts reported while the breaker is not closed change
nothing, and every transition starts the window empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = [
    "BUCKETS",
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "Calls",
    "Rates",
    "Record",
    "acquire",
    "count",
    "crossed",
    "failure",
    "peek",
    "release",
    "success",
    "totals",
]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"  # pybreaker's state names
#: Time buckets per rate window: the window slides by a tenth of its length.
BUCKETS = 10


@dataclass(frozen=True)
class Calls:
    """Guarded calls counted by one process since its last report (or a window's totals)."""

    calls: int = 0
    failures: int = 0
    slow: int = 0

    def __add__(self, other: Calls) -> Calls:
        return Calls(
            self.calls + other.calls, self.failures + other.failures, self.slow + other.slow
        )


@dataclass(frozen=True)
class Rates:
    """The rate window's settings: bucket width (ms) and thresholds (percent, None: off)."""

    bucket: float
    minimum_calls: int
    failure_rate: float | None
    slow_rate: float | None


@dataclass
class Record:
    """One breaker's shared state."""

    state: str = CLOSED
    failures: int = 0
    window_start: float = 0.0
    opened_at: float = 0.0
    #: trial slot -> (token, lease expiry)
    trials: dict[int, tuple[str, float]] = field(default_factory=dict)
    #: rate window: bucket number (``floor(now / bucket)``) -> its counts
    buckets: dict[int, Calls] = field(default_factory=dict)


def peek(rec: Record, now: float, reset: float) -> tuple[str, float]:
    """The state as a caller sees it, and ms until the next trial (0 when one may start)."""
    if rec.state == OPEN:
        wait = rec.opened_at + reset - now
        return (OPEN, wait) if wait > 0 else (HALF_OPEN, 0.0)
    return rec.state, 0.0


def acquire(
    rec: Record, now: float, reset: float, max_trials: int, lease: float, token: str
) -> tuple[str, float, str | None]:
    """May a call start?  ``(answer, wait_ms, transition)``.

    ``answer``: ``"closed"`` (run), ``"trial"`` (run as one of the half-open
    trials), ``"open"`` (do not run; next trial in ``wait_ms``) or
    ``"half-open"`` (do not run: every trial is taken; look again in ``wait_ms``).
    ``transition``: the state entered by this call, if it changed one.
    """
    transition = None
    if rec.state == CLOSED:
        return "closed", 0.0, None
    if rec.state == OPEN:
        wait = rec.opened_at + reset - now
        if wait > 0:
            return "open", wait, None
        rec.state = HALF_OPEN
        rec.trials = {}
        transition = HALF_OPEN
    rec.trials = {slot: held for slot, held in rec.trials.items() if held[1] > now}
    for slot in range(1, max_trials + 1):
        if slot not in rec.trials:
            rec.trials[slot] = (token, now + lease)
            return "trial", 0.0, transition
    # Every trial is taken: look again when the first lease ends, or after one
    # reset at most (a trial usually ends long before its lease does).
    soonest = min(expiry for _, expiry in rec.trials.values()) - now
    return HALF_OPEN, min(soonest, reset), transition


def failure(
    rec: Record,
    now: float,
    fail_max: int,
    window: float,
    token: str | None,
    counted: Calls | None = None,
    rates: Rates | None = None,
) -> str | None:
    """A guarded call failed.  Returns ``"open"`` when this failure opened the breaker.

    With a rate window (``rates``), ``counted`` are the reporting process's
    calls not yet reported, this failure among them: they are counted (see
    :func:`count`) after the ``fail_max`` rule, and either rule opens it.
    """
    if rec.state == CLOSED:
        if now - rec.window_start > window:
            rec.failures, rec.window_start = 0, now
        rec.failures += 1
        if rec.failures >= fail_max:
            _open(rec, now)
            return OPEN
        if counted is not None and rates is not None:
            return count(rec, now, counted, rates)
        return None
    if rec.state == HALF_OPEN and token is not None and _holds(rec, token, now):
        _open(rec, now)
        rec.trials = {}
        return OPEN
    return None


def count(rec: Record, now: float, counted: Calls, rates: Rates) -> str | None:
    """A process reports the calls it counted.  Returns ``"open"`` when a rate opened it.

    Only a closed breaker counts them (nothing is learnt from calls that ran
    on a stale view of an open breaker); they land in the current bucket.
    """
    if rec.state != CLOSED:
        return None
    current = math.floor(now / rates.bucket)
    if counted.calls:
        rec.buckets[current] = rec.buckets.get(current, Calls()) + counted
    if crossed(totals(rec, now, rates), rates):
        _open(rec, now)
        return OPEN
    return None


def totals(rec: Record, now: float, rates: Rates) -> Calls:
    """The counts of the window ending now; buckets that slid out of it are dropped."""
    oldest = math.floor(now / rates.bucket) - BUCKETS + 1
    rec.buckets = {n: c for n, c in rec.buckets.items() if n >= oldest}
    total = Calls()
    for counts in rec.buckets.values():
        total += counts
    return total


def crossed(total: Calls, rates: Rates) -> bool:
    """Whether a window's counts open the breaker: a rate at or over its threshold.

    Never below ``minimum_calls`` calls.  Compared as ``count * 100 >=
    threshold * calls``, so exactly at the threshold opens it.
    """
    if total.calls < rates.minimum_calls:
        return False
    if rates.failure_rate is not None and total.failures * 100 >= rates.failure_rate * total.calls:
        return True
    return rates.slow_rate is not None and total.slow * 100 >= rates.slow_rate * total.calls


def success(rec: Record, now: float, token: str | None) -> str | None:
    """A guarded call succeeded.  Returns ``"closed"`` when this trial closed the breaker."""
    if rec.state == HALF_OPEN and token is not None and _holds(rec, token, now):
        rec.state, rec.failures, rec.window_start, rec.trials = CLOSED, 0, now, {}
        rec.buckets = {}  # a fresh window: nothing before the outage counts
        return CLOSED
    return None


def release(rec: Record, token: str) -> None:
    """A trial granted to a call that then did not run: its slot is free at once.

    Changes no state (nobody learnt anything about the downstream); without
    it the slot would stay taken until its lease ends.
    """
    rec.trials = {slot: held for slot, held in rec.trials.items() if held[0] != token}


def _open(rec: Record, now: float) -> None:
    rec.state, rec.opened_at, rec.failures, rec.buckets = OPEN, now, 0, {}


def _holds(rec: Record, token: str, now: float) -> bool:
    # A lease that has ended is no longer held (as its Redis key has expired):
    # the trial's report then changes nothing.
    return any(held[0] == token and held[1] > now for held in rec.trials.values())
