"""The in-process breaker store (``memory://`` apps): the pure machine under a lock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from . import machine

__all__ = ["MemoryBreakerStore"]


class MemoryBreakerStore:
    """Breaker records in a dict, this process's monotonic clock in milliseconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._records: dict[str, machine.Record] = {}

    def _now(self) -> float:
        return self.clock() * 1000

    def _record(self, name: str) -> machine.Record:
        return self._records.setdefault(name, machine.Record())

    def peek(self, circuit: Any) -> tuple[str, float]:
        with self._lock:
            return machine.peek(
                self._record(circuit.name), self._now(), circuit.breaker.reset_timeout * 1000
            )

    def acquire(self, circuit: Any, token: str) -> tuple[str, float, str | None]:
        breaker = circuit.breaker
        with self._lock:
            return machine.acquire(
                self._record(circuit.name),
                self._now(),
                breaker.reset_timeout * 1000,
                breaker.half_open_max_calls,
                circuit.lease * 1000,
                token,
            )

    def failure(
        self, circuit: Any, token: str | None, counted: machine.Calls | None = None
    ) -> tuple[str, float, str | None]:
        breaker = circuit.breaker
        with self._lock:
            record = self._record(circuit.name)
            now = self._now()
            transition = machine.failure(
                record,
                now,
                breaker.fail_max,
                breaker.failure_window * 1000,
                token,
                counted,
                breaker.rates,
            )
            state, wait = machine.peek(record, now, breaker.reset_timeout * 1000)
        return state, wait, transition

    def count(self, circuit: Any, counted: machine.Calls) -> tuple[str, float, str | None]:
        breaker = circuit.breaker
        with self._lock:
            record = self._record(circuit.name)
            now = self._now()
            rates = breaker.rates
            transition = None if rates is None else machine.count(record, now, counted, rates)
            state, wait = machine.peek(record, now, breaker.reset_timeout * 1000)
        return state, wait, transition

    def success(self, circuit: Any, token: str | None) -> tuple[str, float, str | None]:
        breaker = circuit.breaker
        with self._lock:
            record = self._record(circuit.name)
            now = self._now()
            transition = machine.success(record, now, token)
            state, wait = machine.peek(record, now, breaker.reset_timeout * 1000)
        return state, wait, transition

    def release(self, circuit: Any, token: str) -> tuple[str, float, str | None]:
        with self._lock:
            record = self._record(circuit.name)
            machine.release(record, token)
            state, wait = machine.peek(record, self._now(), circuit.breaker.reset_timeout * 1000)
        return state, wait, None
