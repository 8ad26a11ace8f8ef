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

Opt-in, Resilience4j's rate rules: with ``failure_rate_threshold`` or
``slow_call_duration`` set, it also opens when, over a sliding window of
``failure_window`` seconds (10 time buckets), failures / calls or slow calls
/ calls reach their threshold with at least ``minimum_calls`` calls.  Each
process counts its calls in memory and reports them with its cache refresh
(at most one store call per ``cache_seconds``) or with its next failure, so
successes stay free.

Here: the settings (:class:`Breaker`).  The transitions are pure functions in
:mod:`.machine`, run by a store (:mod:`.memory`, :mod:`.redis` with
``lua/breaker.lua``); a process's runtime is :class:`.circuit.Circuit`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Literal

import pybreaker
from billiard.einfo import ExceptionWithTraceback  # type: ignore[attr-defined]  # not in stubs
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded

from ..errors import ConfigurationError
from ..settings import seconds, whole
from . import machine
from .circuit import Circuit, Verdict, circuits

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "STATE_VALUES",
    "Breaker",
    "Circuit",
    "Verdict",
    "circuits",
    "machine",
]

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
#: ``celery_bulkhead_breaker_state`` values.
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
ON_OPEN = ("defer", "fail", "pause")
ON_STATE_ERROR = ("closed", "open")
#: Celery's control flow: not a downstream failure unless listed in ``include``.
CONTROL_FLOW: tuple[type[BaseException], ...] = (Retry, Ignore, Reject, SoftTimeLimitExceeded)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
#: Bounds of the rate window's settings.
MAX_MINIMUM_CALLS = 1_000_000
MAX_SLOW_CALL_DURATION = 86_400.0


def _exceptions(setting: str, value: Any) -> tuple[type[BaseException], ...]:
    items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise ConfigurationError(
                None, f"breaker.{setting}", value, "a tuple of exception classes"
            )
    return items


def _percent(setting: str, value: Any, *, optional: bool = True) -> float:
    allowed = "a percentage > 0 and <= 100" + (
        ", or None (no failure-rate rule)" if optional else ""
    )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(None, f"breaker.{setting}", value, allowed)
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float (10**400)
        raise ConfigurationError(None, f"breaker.{setting}", value, allowed) from None
    if not 0 < number <= 100:  # NaN fails this too
        raise ConfigurationError(None, f"breaker.{setting}", value, allowed)
    return number


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
            pool's queues until the next trial time; the task is deferred).
        fail_fast_at_submit: raise ``CircuitOpen`` at publish time while open.
        on_state_error: when the shared state cannot be read in time, act as
            if the breaker were ``"closed"`` or ``"open"``.
        failure_window: seconds within which ``fail_max`` failures open it.
        cache_seconds: how stale a process's view of the state may be (the
            price of a free closed breaker).
        listeners: pybreaker ``CircuitBreakerListener`` objects told of every
            transition this process makes (``state_change``).
        failure_rate_threshold: open when failures are at least this percentage
            of the calls in the sliding ``failure_window`` (with at least
            ``minimum_calls`` calls); ``None``: no failure-rate rule.
        minimum_calls: calls the sliding window must hold, fleet-wide, before a
            rate (of failures or of slow calls) can open the breaker.
        slow_call_duration: seconds after which a call counts as slow (from
            when the worker let it through to when it ended); ``None``: no
            slow-call rule.
        slow_call_rate_threshold: open when slow calls are at least this
            percentage of the calls in the sliding window (with at least
            ``minimum_calls`` calls), once ``slow_call_duration`` is set.
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
    failure_rate_threshold: float | None = None
    minimum_calls: int = 10
    slow_call_duration: float | None = None
    slow_call_rate_threshold: float = 100.0

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
        rate = self.failure_rate_threshold
        if rate is not None:
            object.__setattr__(
                self, "failure_rate_threshold", _percent("failure_rate_threshold", rate)
            )
        whole(None, "breaker.minimum_calls", self.minimum_calls, maximum=MAX_MINIMUM_CALLS)
        if self.slow_call_duration is not None:
            try:
                slow = seconds(
                    None,
                    "breaker.slow_call_duration",
                    self.slow_call_duration,
                    maximum=MAX_SLOW_CALL_DURATION,
                )
            except ConfigurationError as error:
                raise ConfigurationError(
                    None,
                    "breaker.slow_call_duration",
                    self.slow_call_duration,
                    f"{error.allowed}, or None (no slow-call rule)",
                ) from None
            object.__setattr__(self, "slow_call_duration", slow)
        object.__setattr__(
            self,
            "slow_call_rate_threshold",
            _percent("slow_call_rate_threshold", self.slow_call_rate_threshold, optional=False),
        )
        rates = None
        if self.failure_rate_threshold is not None or self.slow_call_duration is not None:
            rates = machine.Rates(
                # Whole milliseconds: the same buckets in Lua (server time in ms) and in memory.
                bucket=max(1, round(self.failure_window * 1000 / machine.BUCKETS)),
                minimum_calls=self.minimum_calls,
                failure_rate=self.failure_rate_threshold,
                slow_rate=None
                if self.slow_call_duration is None
                else self.slow_call_rate_threshold,
            )
        object.__setattr__(self, "_rates", rates)

    @property
    def rates(self) -> machine.Rates | None:
        """The rate window's settings for the machine, or None when no rate rule is on."""
        rates: machine.Rates | None = self.__dict__["_rates"]
        return rates

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
