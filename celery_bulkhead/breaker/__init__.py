"""A circuit breaker for a pool's downstream, shared by the whole fleet.

When a pool's downstream fails, every worker of the fleet should stop calling
it at once, probe it gently, and resume, without losing a task on the way.
A :class:`Breaker` on a pool does that with pybreaker's state machine
(closed → open → half-open → closed), its state names and its
:class:`pybreaker.CircuitBreakerListener` interface, made fleet-wide:

* the state lives in Redis (``bulkhead_state_url``), each transition one
  atomic Lua call on Redis server time (``lua/breaker.lua``; in-process on
  ``memory://``), with a ``{hash tag}`` per breaker and TTL'd keys;
* half-open trials are leases (``SET NX PX``): at most
  ``half_open_max_calls`` trial calls run at once across the fleet;
* it is free when closed: a process keeps the state it last saw for
  ``cache_seconds`` (1 s), so a closed breaker costs no Redis call per task
  on the success path; failures are what reach Redis;
* no lock is held across a task (pybreaker#3): the check and the outcome
  are two short calls in the worker's main process.

It opens when ``fail_max`` failures fall within ``failure_window`` seconds
(fleet-wide); a success does not reset the count, which is what keeps
successes free.  ``reset_timeout`` seconds after opening, trials may run; a
trial that succeeds closes it, one that fails opens it again.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import pybreaker
from billiard.einfo import ExceptionWithTraceback  # type: ignore[attr-defined]  # not in stubs
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded

from ..errors import ConfigurationError
from ..settings import seconds, whole
from . import machine

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "STATE_VALUES", "Breaker", "Circuit"]

logger = logging.getLogger("celery_bulkhead.breaker")

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
#: ``celery_bulkhead_breaker_state`` values.
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
ON_OPEN = ("defer", "fail", "pause")
ON_STATE_ERROR = ("closed", "open")
#: Celery's control flow: not a downstream failure unless listed in ``include``.
CONTROL_FLOW: tuple[type[BaseException], ...] = (Retry, Ignore, Reject, SoftTimeLimitExceeded)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _exceptions(setting: str, value: Any) -> tuple[type[BaseException], ...]:
    items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise ConfigurationError(
                None, f"breaker.{setting}", value, "a tuple of exception classes"
            )
    return items


@dataclass(frozen=True, init=False)
class Breaker:
    """A pool's circuit breaker, shared by every worker and producer of the fleet.

    Args:
        fail_max: failures within ``failure_window`` that open the breaker.
        reset_timeout: seconds it stays open before trial calls may run.
        exclude: exception classes that are not downstream failures (a 4xx).
        include: Celery control-flow exceptions (``Retry``, ``Ignore``,
            ``Reject``, ``SoftTimeLimitExceeded``) to count as failures anyway.
        name: the breaker's name (default: the pool's); pools naming the same
            breaker share one downstream's state.
        half_open_max_calls: trial calls allowed at once, fleet-wide, when half-open.
        on_open: what a worker does with a task while the breaker is open:
            ``"defer"`` (publish it again for the next trial time), ``"fail"``
            (fail it with ``CircuitOpen``) or ``"pause"`` (stop consuming the
            pool's queue until the next trial time; the task is deferred).
        fail_fast_at_submit: raise ``CircuitOpen`` at publish time while open.
        on_state_error: when the shared state cannot be read in time, act as
            if the breaker were ``"closed"`` or ``"open"``.
        failure_window: seconds within which ``fail_max`` failures open it.
        cache_seconds: how stale a process's view of the state may be (the
            price of a free closed breaker).
        listeners: pybreaker ``CircuitBreakerListener`` objects told of every
            transition this process makes (``state_change``).
    """

    fail_max: int = 5
    reset_timeout: float = 30.0
    exclude: tuple[type[BaseException], ...] = ()
    include: tuple[type[BaseException], ...] = ()
    name: str | None = None
    half_open_max_calls: int = 1
    on_open: Literal["defer", "fail", "pause"] = "defer"
    fail_fast_at_submit: bool = False
    on_state_error: Literal["closed", "open"] = "closed"
    failure_window: float = 60.0
    cache_seconds: float = 1.0
    listeners: tuple[Any, ...] = ()

    def __init__(self, **settings: Any) -> None:
        allowed = [f.name for f in fields(Breaker)]
        for key in settings:
            if key not in allowed:
                raise ConfigurationError(
                    None,
                    f"breaker.{key}",
                    settings[key],
                    "one of " + ", ".join(allowed),
                    detail="unknown setting",
                )
        for f in fields(Breaker):
            object.__setattr__(self, f.name, settings.get(f.name, f.default))
        self._validate()

    def _validate(self) -> None:
        whole(None, "breaker.fail_max", self.fail_max, maximum=100_000)
        object.__setattr__(
            self,
            "reset_timeout",
            seconds(None, "breaker.reset_timeout", self.reset_timeout, maximum=86_400),
        )
        object.__setattr__(self, "exclude", _exceptions("exclude", self.exclude))
        object.__setattr__(self, "include", _exceptions("include", self.include))
        if self.name is not None and (
            not isinstance(self.name, str) or not _NAME_RE.match(self.name)
        ):
            raise ConfigurationError(
                None, "breaker.name", self.name, "1-63 letters, digits, '_', '.' or '-', or None"
            )
        whole(None, "breaker.half_open_max_calls", self.half_open_max_calls, maximum=100)
        for setting, options in (("on_open", ON_OPEN), ("on_state_error", ON_STATE_ERROR)):
            value = getattr(self, setting)
            if value not in options:
                allowed = "one of " + ", ".join(options)
                raise ConfigurationError(None, f"breaker.{setting}", value, allowed)
        if not isinstance(self.fail_fast_at_submit, bool):
            raise ConfigurationError(
                None, "breaker.fail_fast_at_submit", self.fail_fast_at_submit, "True or False"
            )
        object.__setattr__(
            self,
            "failure_window",
            seconds(None, "breaker.failure_window", self.failure_window, maximum=86_400),
        )
        cache = seconds(None, "breaker.cache_seconds", self.cache_seconds, maximum=60)
        assert cache is not None
        if cache < 0.05:
            raise ConfigurationError(
                None, "breaker.cache_seconds", self.cache_seconds, "seconds >= 0.05 and <= 60"
            )
        object.__setattr__(self, "cache_seconds", cache)
        allowed = "a tuple of pybreaker.CircuitBreakerListener objects (with state_change)"
        try:
            listeners = tuple(self.listeners)
        except TypeError:  # one listener, not a tuple of them
            raise ConfigurationError(None, "breaker.listeners", self.listeners, allowed) from None
        for listener in listeners:
            if not callable(getattr(listener, "state_change", None)):
                raise ConfigurationError(None, "breaker.listeners", listener, allowed)
        object.__setattr__(self, "listeners", listeners)

    @classmethod
    def from_mapping(cls, value: Any) -> Breaker:
        """Build one from a settings mapping (``{"fail_max": 5, "reset_timeout": 30}``)."""
        if not isinstance(value, dict):
            raise ConfigurationError(None, "breaker", value, "a Breaker or a mapping of settings")
        return cls(**value)

    def is_failure(self, exc: BaseException | None) -> bool:
        """Whether a task that ended with ``exc`` counts as a downstream failure."""
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if exc is None or isinstance(exc, self.exclude):
            return False
        return not isinstance(exc, CONTROL_FLOW) or isinstance(exc, self.include)


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
    """One breaker's runtime in this process: the cached state, the store, the listeners."""

    def __init__(self, name: str, breaker: Breaker, store: Any, lease: float) -> None:
        self.name = name
        self.breaker = breaker
        self.store = store
        self.lease = lease
        self.transitions: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._state = CLOSED
        self._until = 0.0  # monotonic: the cached state is good until then
        self._retry_at = 0.0  # monotonic: when the next trial may start
        self._errors = 0
        self._last_log = -math.inf

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
        """``(state, seconds until the next trial)``, at most ``cache_seconds`` stale."""
        now = time.monotonic()
        if now >= self._until:
            try:
                state, wait = self.store.peek(self)
            except Exception as exc:
                return self._state_error("peek", exc)
            self._remember(state, wait)
            now = time.monotonic()
        return self._state, max(0.0, self._retry_at - now)

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

    def after(self, token: str | None, exc: BaseException | None) -> None:
        """Report how a guarded task ended (only failures and trials reach the store)."""
        if token is None and exc is None:
            return  # the hot path: a success while closed
        failed = self.breaker.is_failure(exc)
        if not failed and token is None:
            return  # control flow or an excluded exception: not the downstream's failure
        try:
            if failed:
                state, wait, transition = self.store.failure(self, token)
            else:
                state, wait, transition = self.store.success(self, token)
        except Exception as exc2:
            self._state_error("failure" if failed else "success", exc2)
            return
        if transition:
            self._changed(HALF_OPEN if token else CLOSED, transition)
        self._remember(state, wait)

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


__all__ += ["Verdict", "circuits", "machine"]
