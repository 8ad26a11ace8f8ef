"""Per-tenant limits inside a pool: a fleet-wide token bucket and an in-flight cap.

A pool isolates kinds of work from each other; inside a pool one tenant can
still flood the queue or hold every slot.  A :class:`TenantLimit` on the pool
gives every tenant its own budget, shared by the whole fleet through Redis
(``bulkhead_state_url``; the broker's own Redis by default, an in-process
store on ``memory://``):

* ``rate`` and ``burst``: a token bucket (GCRA, :mod:`.bucket`) checked when
  the task is published (``enforce="submit"``), when a worker receives it
  (``"worker"``), or both;
* ``max_inflight``: at most that many of a tenant's tasks run at once,
  fleet-wide, through crash-safe leases taken when a worker receives the
  task and released when it ends (always enforced at the worker).

At the limit, ``on_limited`` decides: ``"reject"`` raises
:class:`~celery_bulkhead.TenantLimited` (with ``retry_after``), ``"drop"``
returns a :class:`~celery_bulkhead.DroppedResult`, ``"defer"`` publishes the
task with a countdown to the moment its token is due (the slot is reserved,
so deferred work is spaced at the rate).  Nothing is lost: a task limited at
the worker is published again, not retried and not failed.

Tenant ids are untrusted input (:func:`tenant_id`): they are checked before
they touch a key, and keys carry a digest of the id, never the id itself.
"""

from __future__ import annotations

import functools
import hashlib
import math
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from ..errors import ConfigurationError
from ..settings import whole

__all__ = [
    "HEADER_PREFIX",
    "MAX_TENANT_BYTES",
    "MIN_RATE",
    "TenantLimit",
    "bucket_key",
    "lease_key",
    "parse_rate",
    "tenant_id",
]

OnLimited = Literal["reject", "drop", "defer"]
Enforce = Literal["submit", "worker", "both"]
ON_LIMITED = ("reject", "drop", "defer")
ENFORCE = ("submit", "worker", "both")
ON_STATE_ERROR = ("allow", "deny")
#: ``key="header:X-Tenant"`` reads the tenant from a message header.
HEADER_PREFIX = "header:"
MAX_TENANT_BYTES = 128
MAX_RATE = 1_000_000.0  # per second
#: The slowest rate: a full bucket (MAX_BURST intervals) must stay within the
#: 64-bit microseconds the Lua scripts store and expire (one per ~11.6 days).
MIN_RATE = 1e-6
MAX_BURST = 1_000_000
MAX_INFLIGHT = 100_000
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE_ALLOWED = "a rate such as '10/s', '600/m' or '3600/h' (or a number per second), > 0"


def parse_rate(value: Any, setting: str = "tenant.rate") -> float:
    """Requests per second from Celery's rate forms (``"10/s"``, ``"600/m"``, ``"3600/h"``)."""
    if isinstance(value, bool):
        raise ConfigurationError(None, setting, value, _RATE_ALLOWED)
    if isinstance(value, (int, float)):
        number, per = value, 1.0
    elif isinstance(value, str):
        count, _, unit = value.strip().partition("/")
        try:
            number = float(count)
        except ValueError:
            raise ConfigurationError(None, setting, value, _RATE_ALLOWED) from None
        per = _UNITS.get(unit.strip().lower() or "s", 0.0)
        if not per:
            raise ConfigurationError(None, setting, value, _RATE_ALLOWED)
    else:
        raise ConfigurationError(None, setting, value, _RATE_ALLOWED)
    try:
        rate = float(number) / per
    except OverflowError:
        raise ConfigurationError(None, setting, value, _RATE_ALLOWED) from None
    if not math.isfinite(rate) or not MIN_RATE <= rate <= MAX_RATE:
        raise ConfigurationError(
            None, setting, value, f"{_RATE_ALLOWED}, from {MIN_RATE:g}/s to {MAX_RATE:g}/s"
        )
    return rate


@dataclass(frozen=True, init=False)
class TenantLimit:
    """A per-tenant budget inside a pool, shared by every producer and worker.

    Args:
        key: where the tenant id comes from: a task keyword argument's name
            (``"tenant_id"``), a callable ``(args, kwargs) -> str``, or
            ``"header:<name>"`` for a message header.
        rate: sustained requests per tenant (``"10/s"``, ``"600/m"``,
            ``"3600/h"`` or a number per second, from ``MIN_RATE`` (one
            request per ~11.6 days) to 1,000,000/s); None for no rate limit.
        burst: requests a tenant may make at once from a full bucket
            (default: one second's worth of ``rate``, at least 1).
        max_inflight: tasks of one tenant running at once, fleet-wide
            (None: no cap).  Enforced at the worker.
        on_limited: ``"reject"`` (raise ``TenantLimited``), ``"drop"``
            (a ``DroppedResult``) or ``"defer"`` (publish with a countdown).
        enforce: where the rate is checked: ``"submit"``, ``"worker"`` or ``"both"``.
        on_state_error: when the shared state cannot be reached in time:
            ``"allow"`` the publish (fail open) or ``"deny"`` it (fail closed).
        max_deferrals: how often a worker pushes one task back before it
            runs anyway (a bound on starvation).
        max_defer: the furthest ahead, in seconds, a slot is reserved for a
            deferred task; beyond it the task is refused (``TenantLimited``).
    """

    key: str | Callable[[tuple[Any, ...], dict[str, Any]], Any]
    rate: float | None = None
    burst: int | None = None
    max_inflight: int | None = None
    on_limited: OnLimited = "reject"
    enforce: Enforce = "submit"
    on_state_error: Literal["allow", "deny"] = "allow"
    max_deferrals: int = 10
    max_defer: float = 300.0

    def __init__(self, key: Any, **settings: Any) -> None:
        allowed = [f.name for f in fields(TenantLimit) if f.name != "key"]
        for name in settings:
            if name not in allowed:
                raise ConfigurationError(
                    None,
                    f"tenant.{name}",
                    settings[name],
                    "one of " + ", ".join(allowed),
                    detail="unknown setting",
                )
        object.__setattr__(self, "key", key)
        for f in fields(TenantLimit):
            if f.name != "key":
                object.__setattr__(self, f.name, settings.get(f.name, f.default))
        self._validate()

    def _validate(self) -> None:
        key = self.key
        if isinstance(key, str):
            name = key[len(HEADER_PREFIX) :] if key.startswith(HEADER_PREFIX) else key
            if not name.strip():
                raise ConfigurationError(
                    None,
                    "tenant.key",
                    key,
                    "a kwarg name, 'header:<name>' or a callable (args, kwargs) -> str",
                )
        elif not callable(key):
            raise ConfigurationError(
                None,
                "tenant.key",
                key,
                "a kwarg name, 'header:<name>' or a callable (args, kwargs) -> str",
            )
        rate = None if self.rate is None else parse_rate(self.rate)
        object.__setattr__(self, "rate", rate)
        burst = self.burst
        if burst is None and rate is not None:
            burst = max(1, math.ceil(rate))
        if burst is not None:
            whole(None, "tenant.burst", burst, maximum=MAX_BURST)
        object.__setattr__(self, "burst", burst)
        whole(None, "tenant.max_inflight", self.max_inflight, maximum=MAX_INFLIGHT, optional=True)
        if rate is None and self.max_inflight is None:
            raise ConfigurationError(
                None, "tenant.rate", None, "a rate, a max_inflight, or both", detail="no limit set"
            )
        for setting, options in (
            ("on_limited", ON_LIMITED),
            ("enforce", ENFORCE),
            ("on_state_error", ON_STATE_ERROR),
        ):
            if getattr(self, setting) not in options:
                raise ConfigurationError(
                    None,
                    f"tenant.{setting}",
                    getattr(self, setting),
                    "one of " + ", ".join(options),
                )
        whole(None, "tenant.max_deferrals", self.max_deferrals, minimum=0, maximum=1000)
        if (
            isinstance(self.max_defer, bool)
            or not isinstance(self.max_defer, (int, float))
            or not 0 < self.max_defer <= 3600
        ):
            raise ConfigurationError(
                None, "tenant.max_defer", self.max_defer, "a number of seconds > 0 and <= 3600"
            )

    @property
    def at_submit(self) -> bool:
        """Whether the rate is checked when a task is published."""
        return self.rate is not None and self.enforce in ("submit", "both")

    @property
    def at_worker(self) -> bool:
        """Whether a worker checks the task when it receives it (rate or in-flight cap)."""
        return self.max_inflight is not None or (
            self.rate is not None and self.enforce in ("worker", "both")
        )

    @property
    def interval(self) -> float:
        """Seconds one request costs (``1 / rate``)."""
        assert self.rate is not None
        return 1.0 / self.rate

    @classmethod
    def from_mapping(cls, value: Mapping[str, Any]) -> TenantLimit:
        """Build one from a settings mapping (``{"key": "tenant_id", "rate": "10/s", ...}``)."""
        if not isinstance(value, Mapping) or "key" not in value:
            raise ConfigurationError(
                None, "tenant", value, "a TenantLimit or a mapping with a 'key'"
            )
        data = dict(value)
        return cls(data.pop("key"), **data)

    def tenant_of(
        self, args: Any, kwargs: Any, headers: Mapping[str, Any] | None, task: str
    ) -> str:
        """The (validated) tenant id of one call of ``task``."""
        key = self.key
        if callable(key):
            try:
                value = key(tuple(args or ()), dict(kwargs or {}))
            except Exception as exc:
                raise ConfigurationError(
                    None,
                    "tenant.key",
                    getattr(key, "__name__", "callable"),
                    "a callable that returns the tenant id",
                    detail=f"it raised {type(exc).__name__} for task {task!r}",
                ) from exc
            return tenant_id(value, task)
        if key.startswith(HEADER_PREFIX):
            header = key[len(HEADER_PREFIX) :]
            if not headers or header not in headers:
                raise ConfigurationError(
                    None,
                    "tenant.key",
                    key,
                    "a header present on every publish of the pool's tasks",
                    detail=f"task {task!r} was published without the header {header!r}",
                )
            return tenant_id(headers[header], task)
        if not isinstance(kwargs, Mapping) or key not in kwargs:
            raise ConfigurationError(
                None,
                "tenant.key",
                key,
                "a keyword argument passed on every call of the pool's tasks",
                detail=f"task {task!r} was called without {key}=...",
            )
        return tenant_id(kwargs[key], task)


_ID_ALLOWED = (
    f"a tenant id: a non-empty str (or int) of at most {MAX_TENANT_BYTES} UTF-8 bytes "
    "after NFC normalisation, without control characters or lone surrogates"
)


#: An int wider than this (in bits) has more than MAX_TENANT_BYTES decimal digits.
_MAX_ID_BITS = math.ceil(MAX_TENANT_BYTES * math.log2(10)) + 1


def _bad_id(value: Any, task: str, why: str) -> ConfigurationError:
    # The id itself is untrusted: the message describes it, never repeats it.
    return ConfigurationError(
        None, "tenant id", f"<{type(value).__name__}>", _ID_ALLOWED, detail=f"task {task!r}: {why}"
    )


def tenant_id(value: Any, task: str = "?") -> str:
    """``value`` as a tenant id: checked, NFC-normalised; a clear error otherwise.

    Ints are converted with ``str()`` (so ``7`` and ``"7"`` are one tenant);
    ``None``, bools, floats, bytes and anything else are refused.
    """
    if isinstance(value, bool) or (not isinstance(value, (str, int))):
        return _raise(_bad_id(value, task, f"a {type(value).__name__} is not a tenant id"))
    if isinstance(value, int):
        if abs(value).bit_length() > _MAX_ID_BITS:  # str() of a huge int is slow, then refused
            return _raise(_bad_id(value, task, f"an int of over {MAX_TENANT_BYTES} digits"))
        text = str(int(value))  # int(): an IntEnum is its number, as anywhere else
    else:
        text = value
    if text.isascii() and text.isprintable() and 0 < len(text) <= MAX_TENANT_BYTES:
        return text  # the common case: nothing to normalise, nothing to refuse
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        return _raise(_bad_id(value, task, "it contains a lone surrogate"))
    if len(encoded) > 4 * MAX_TENANT_BYTES:  # bound the work before normalising
        return _raise(_bad_id(value, task, f"{len(encoded)} bytes"))
    text = unicodedata.normalize("NFC", text)
    size = len(text.encode("utf-8"))
    if not text:
        return _raise(_bad_id(value, task, "it is empty"))
    if size > MAX_TENANT_BYTES:
        return _raise(_bad_id(value, task, f"{size} bytes"))
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in text):
        return _raise(_bad_id(value, task, "it contains a control character or line break"))
    return text


def _raise(error: ConfigurationError) -> str:
    raise error


@functools.lru_cache(maxsize=4096)
def digest(tenant: str) -> str:
    """A fixed-length digest of a tenant id: what keys carry instead of the id."""
    return hashlib.blake2b(tenant.encode("utf-8"), digest_size=12).hexdigest()


def bucket_key(pool: str, tenant: str) -> str:
    """The Redis key of a tenant's bucket in a pool (its own ``{hash tag}``)."""
    return f"bulkhead:{{{pool}:{digest(tenant)}}}:rate"


def lease_key(pool: str, tenant: str) -> str:
    """The Redis key of a tenant's in-flight leases in a pool."""
    return f"bulkhead:{{{pool}:{digest(tenant)}}}:leases"
