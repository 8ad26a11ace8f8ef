"""The Redis breaker store: every transition one call of ``lua/breaker.lua``.

Keys: ``bulkhead:{breaker:<name>}:state`` (a hash: the record, and the rate
window's bucket counts when one is on) and one
``bulkhead:{breaker:<name>}:trial:<slot>`` lease per half-open trial, all
under the breaker's ``{hash tag}``.  The record expires when nothing has
happened for ``max(2 * reset_timeout, failure_window, 60 s)``, and never
while a trial's lease runs: an idle, closed breaker leaves nothing behind.

Redis-only: imports redis-py through the tenant store's client settings.
"""

from __future__ import annotations

from typing import Any

from .. import scripts
from ..tenants.redis import RedisStore
from . import machine

__all__ = ["RedisBreakerStore"]

_NO_CALLS = machine.Calls()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _percent(value: float | None) -> str:
    # repr: the shortest text Lua's tonumber reads back as the same double.
    return "" if value is None else repr(float(value))


class RedisBreakerStore:
    """Breaker transitions in Redis (server time), one Lua call each."""

    def __init__(self, url: str, timeout: float) -> None:
        self._redis = RedisStore(url, timeout)  # one client per process, bounded timeouts

    def _call(
        self, circuit: Any, op: str, token: str | None, counted: machine.Calls = _NO_CALLS
    ) -> tuple[str, float, str | None]:
        breaker = circuit.breaker
        tag = f"bulkhead:{{breaker:{circuit.name}}}"
        keys = [f"{tag}:state"]
        keys += [f"{tag}:trial:{slot}" for slot in range(1, breaker.half_open_max_calls + 1)]
        ttl = max(2 * breaker.reset_timeout, breaker.failure_window, 60.0)
        rates = breaker.rates
        state, wait, transition = scripts.run(
            self._redis.client,
            scripts.load("breaker"),
            str(len(keys)).encode(),
            *keys,
            op,
            round(breaker.reset_timeout * 1000),
            breaker.fail_max,
            breaker.half_open_max_calls,
            max(1, round(circuit.lease * 1000)),
            token or "",
            round(breaker.failure_window * 1000),
            round(ttl * 1000),
            # The rate window ("" for bucket width: none).
            "" if rates is None else round(rates.bucket),
            machine.BUCKETS,
            "" if rates is None else rates.minimum_calls,
            _percent(None if rates is None else rates.failure_rate),
            _percent(None if rates is None else rates.slow_rate),
            counted.calls,
            counted.failures,
            counted.slow,
        )
        return _text(state), float(wait), _text(transition) or None

    def peek(self, circuit: Any) -> tuple[str, float]:
        state, wait, _ = self._call(circuit, "peek", None)
        return state, wait

    def acquire(self, circuit: Any, token: str) -> tuple[str, float, str | None]:
        return self._call(circuit, "acquire", token)

    def failure(
        self, circuit: Any, token: str | None, counted: machine.Calls | None = None
    ) -> tuple[str, float, str | None]:
        return self._call(circuit, "failure", token, counted or _NO_CALLS)

    def count(self, circuit: Any, counted: machine.Calls) -> tuple[str, float, str | None]:
        return self._call(circuit, "count", None, counted)

    def success(self, circuit: Any, token: str | None) -> tuple[str, float, str | None]:
        return self._call(circuit, "success", token)

    def release(self, circuit: Any, token: str) -> tuple[str, float, str | None]:
        return self._call(circuit, "release", token)
