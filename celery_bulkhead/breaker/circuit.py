"""One breaker's runtime in a process: the cached state, the store calls, the listeners.

A :class:`Circuit` is what the worker gate and the publish path talk to: it
keeps the state it last saw for ``cache_seconds`` (so a closed breaker costs
no store call per task), asks the store (:mod:`.memory` or :mod:`.redis`)
for trials and reports failures, and, with a rate window on, counts this
process's calls in memory and reports them with its refresh.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import pybreaker

from ..errors import ConfigurationError
from . import machine

if TYPE_CHECKING:
    from . import Breaker

__all__ = ["Circuit", "Verdict", "circuits"]

# The package's logger: what a user configures for "the breaker".
logger = logging.getLogger("celery_bulkhead.breaker")

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN


@dataclass(frozen=True)
class _State:
    """A pybreaker-style state object for ``CircuitBreakerListener.state_change``."""

    name: str


@dataclass(frozen=True)
class Verdict:
    """What :meth:`Circuit.before` says: run (maybe as a trial) or not, for how long."""

    run: bool
    token: str | None = None
    retry_after: float = 0.0


_RUN = Verdict(True)


class Circuit:
    """One breaker's runtime in this process: the cached state, the store, the listeners.

    With a rate window on, also this process's calls not yet reported: they
    reach the store with the next refresh of the cached state (at most once
    per ``cache_seconds``) or with the next failure, never one call per task.
    A process that exits loses the ones it has not reported: at most one
    ``cache_seconds`` worth of calls.
    """

    def __init__(self, name: str, breaker: Breaker, store: Any, lease: float) -> None:
        self.name = name
        self.breaker = breaker
        self.store = store
        self.lease = lease
        self.transitions: Counter[str] = Counter()
        self._lock = threading.Lock()
        # Held by the one thread refreshing the cached state; the others use the
        # cached state meanwhile (a threads pool's tasks end in many threads at once).
        self._refreshing = threading.Lock()
        self._state = CLOSED
        self._until = 0.0  # monotonic: the cached state is good until then
        self._retry_at = 0.0  # monotonic: when the next trial may start
        self._errors = 0
        self._last_log = -math.inf
        # The rate window: this process's calls since its last report.
        self._counting = breaker.rates is not None
        self._slow = breaker.slow_call_duration
        self._calls = self._failures = self._slow_calls = 0

    # -- the cached view -----------------------------------------------------------

    def _remember(self, state: str, wait_ms: float) -> None:
        now = time.monotonic()
        with self._lock:
            self._state = state
            self._retry_at = now + max(0.0, wait_ms) / 1000
            self._until = now + (
                self.breaker.cache_seconds
                if state == CLOSED
                else min(self.breaker.cache_seconds, max(0.0, wait_ms) / 1000)
            )

    def state(self) -> tuple[str, float]:
        """``(state, seconds until the next trial)``, at most ``cache_seconds`` stale.

        A refresh also reports the calls this process counted since its last
        report (with a rate window on): still one store call.
        """
        now = time.monotonic()
        if now >= self._until and self._refreshing.acquire(blocking=False):
            try:
                self._refresh()
            finally:
                self._refreshing.release()
            now = time.monotonic()
        return self._state, max(0.0, self._retry_at - now)

    def _refresh(self) -> None:
        counted = self._take() if self._counting else None
        try:
            if counted is None:
                state, wait = self.store.peek(self)
                transition = None
            else:
                state, wait, transition = self.store.count(self, counted)
        except Exception as exc:
            self._state_error("peek" if counted is None else "count", exc)
            return
        if transition:
            self._changed(CLOSED, transition)
        self._remember(state, wait)

    def _take(self, failed: bool = False, slow: bool = False) -> machine.Calls | None:
        """The calls counted since the last report (and one more), counting from zero again."""
        with self._lock:
            counted = machine.Calls(
                self._calls + failed, self._failures + failed, self._slow_calls + slow
            )
            self._calls = self._failures = self._slow_calls = 0
        return counted if counted.calls else None

    def _is_slow(self, duration: float | None) -> bool:
        return self._slow is not None and duration is not None and duration > self._slow

    # -- around a guarded call (the worker's main process) ---------------------------

    def before(self) -> Verdict:
        """May a task start now?  Free while the cached state is a fresh "closed"."""
        if self._state == CLOSED and time.monotonic() < self._until:
            return _RUN  # the hot path: no store call, no allocation
        state, retry_after = self.state()
        if state == CLOSED:
            return _RUN
        if retry_after > 0:  # open, or half-open with every trial taken
            return Verdict(False, retry_after=retry_after)
        token = uuid.uuid4().hex
        try:
            answer, wait, transition = self.store.acquire(self, token)
        except Exception as exc:
            state, retry_after = self._state_error("acquire", exc)
            return Verdict(state == CLOSED, retry_after=retry_after)
        if transition:
            self._changed(OPEN, transition)
        if answer == "trial":
            self._remember(HALF_OPEN, 0.0)
            return Verdict(True, token=token)
        if answer == CLOSED:
            self._remember(CLOSED, 0.0)
            return _RUN
        # "open" (another process opened it again) or "half-open" (every trial is taken).
        self._remember(HALF_OPEN if answer == HALF_OPEN else OPEN, wait)
        return Verdict(False, retry_after=max(wait / 1000, 0.05))

    def after(
        self, token: str | None, exc: BaseException | None, duration: float | None = None
    ) -> None:
        """Report how a guarded task ended (only failures and trials reach the store).

        ``duration``: seconds from when the task was let through to when it
        ended, for ``slow_call_duration``.  With a rate window on, a call
        that did not fail is counted here, in memory; it reaches the store
        with the next refresh of the cached state.
        """
        if token is None and exc is None:
            if self._counting:
                self._count(duration)
            return  # the hot path: a success while closed
        failed = self.breaker.is_failure(exc)
        if not failed and token is None:
            # Control flow or an excluded exception: not the downstream's failure,
            # so a call that did not fail.
            if self._counting:
                self._count(duration)
            return
        counted = None
        if failed and token is None and self._counting:
            counted = self._take(failed=True, slow=self._is_slow(duration))
        try:
            if counted is not None:
                state, wait, transition = self.store.failure(self, token, counted)
            elif failed:
                state, wait, transition = self.store.failure(self, token)
            else:
                state, wait, transition = self.store.success(self, token)
        except Exception as exc2:
            self._state_error("failure" if failed else "success", exc2)
            return
        if transition:
            self._changed(HALF_OPEN if token else CLOSED, transition)
        self._remember(state, wait)

    def _count(self, duration: float | None) -> None:
        """A guarded call that did not fail, counted in memory; reported when the cache is due."""
        slow = self._is_slow(duration)
        with self._lock:
            self._calls += 1
            if slow:
                self._slow_calls += 1
        if time.monotonic() >= self._until:
            self.state()  # the refresh that reports them (otherwise the next task's)

    def release(self, token: str | None) -> None:
        """Give back a trial granted to a task that then did not run (deferred, revoked).

        Its slot is free at once instead of when its lease ends (a minute or
        more, during which no other trial could run).  Best effort: if the
        store cannot be reached, the lease still ends on its own.
        """
        if token is None:
            return
        try:
            state, wait, _ = self.store.release(self, token)
        except Exception as exc:
            logger.debug("celery-bulkhead: breaker %r: release failed: %r", self.name, exc)
            return
        self._remember(state, wait)

    # -- bookkeeping ------------------------------------------------------------------

    def _changed(self, old: str, new: str) -> None:
        with self._lock:
            self.transitions[new] += 1
        for listener in self.breaker.listeners:
            try:
                # pybreaker passes its breaker; this circuit has the same ``.name``.
                listener.state_change(self, _State(old), _State(new))
            except Exception:
                logger.exception("celery-bulkhead: breaker %r: a listener failed", self.name)

    def _state_error(self, operation: str, exc: BaseException) -> tuple[str, float]:
        """The configured fallback when the store cannot answer; logged every 10 s at most."""
        now = time.monotonic()
        with self._lock:
            self._errors += 1
            log = now - self._last_log >= 10.0
            if log:
                self._last_log, count, self._errors = now, self._errors, 0
        if log:
            logger.warning(
                "celery-bulkhead: breaker %r: state unavailable (%s: %s), %d time(s) since the "
                "last report; acting as %s",
                self.name,
                operation,
                type(exc).__name__,
                count,
                self.breaker.on_state_error,
            )
        fallback = CLOSED if self.breaker.on_state_error == "closed" else OPEN
        retry = 0.0 if fallback == CLOSED else self.breaker.cache_seconds
        self._remember(fallback, retry * 1000)
        return fallback, retry


def _named(breaker: Breaker, name: str) -> Breaker:
    return breaker if breaker.name == name else replace(breaker, name=name)


def circuits(pools: Iterable[Any], make_store: Any, lease_of: Any) -> dict[str, Circuit]:
    """One :class:`Circuit` per breaker name; pools sharing a name must agree on its settings."""
    found: dict[str, Circuit] = {}
    for pool in pools:
        breaker = pool.breaker
        if breaker is None:
            continue
        name = breaker.name or pool.name
        if name in found:
            # Compared with the name resolved: Breaker() on pool "a" is Breaker(name="a").
            if _named(found[name].breaker, name) != _named(breaker, name):
                raise ConfigurationError(
                    pool.name,
                    "breaker",
                    name,
                    "the same settings in every pool that shares a breaker",
                    detail=f"breaker {name!r} is declared differently by another pool",
                )
            continue
        found[name] = Circuit(name, breaker, make_store(), lease_of(pool))
    return found
