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
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "Record",
    "acquire",
    "failure",
    "peek",
    "release",
    "success",
]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"  # pybreaker's state names


@dataclass
class Record:
    """One breaker's shared state."""

    state: str = CLOSED
    failures: int = 0
    window_start: float = 0.0
    opened_at: float = 0.0
    #: trial slot -> (token, lease expiry)
    trials: dict[int, tuple[str, float]] = field(default_factory=dict)


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


def failure(rec: Record, now: float, fail_max: int, window: float, token: str | None) -> str | None:
    """A guarded call failed.  Returns ``"open"`` when this failure opened the breaker."""
    if rec.state == CLOSED:
        if now - rec.window_start > window:
            rec.failures, rec.window_start = 0, now
        rec.failures += 1
        if rec.failures >= fail_max:
            rec.state, rec.opened_at, rec.failures = OPEN, now, 0
            return OPEN
        return None
    if rec.state == HALF_OPEN and token is not None and _holds(rec, token, now):
        rec.state, rec.opened_at, rec.failures, rec.trials = OPEN, now, 0, {}
        return OPEN
    return None


def success(rec: Record, now: float, token: str | None) -> str | None:
    """A guarded call succeeded.  Returns ``"closed"`` when this trial closed the breaker."""
    if rec.state == HALF_OPEN and token is not None and _holds(rec, token, now):
        rec.state, rec.failures, rec.window_start, rec.trials = CLOSED, 0, now, {}
        return CLOSED
    return None


def release(rec: Record, token: str) -> None:
    """A trial granted to a call that then did not run: its slot is free at once.

    Changes no state (nobody learnt anything about the downstream); without
    it the slot would stay taken until its lease ends.
    """
    rec.trials = {slot: held for slot, held in rec.trials.items() if held[0] != token}


def _holds(rec: Record, token: str, now: float) -> bool:
    # A lease that has ended is no longer held (as its Redis key has expired):
    # the trial's report then changes nothing.
    return any(held[0] == token and held[1] > now for held in rec.trials.values())
