"""Exact queue caps, one backend per kombu transport.

=============  ============================================================
transport      how the cap is exact
=============  ============================================================
Redis          :mod:`.redis`: the depth check and the push are one Lua call
RabbitMQ       :mod:`.amqp`: the broker refuses (``x-max-length`` with
               ``reject-publish``), publisher confirms report it
``memory://``  :mod:`.memory`: check and put under a process-wide lock
=============  ============================================================

Any other transport cannot cap a queue exactly: :func:`check_transport`
refuses a capped pool there when the ``Bulkhead`` is built.

kombu calls a virtual transport's ``Channel._put`` deep inside
``Producer.publish``, with no way to pass anything along.  Admission sets
:data:`CURRENT` around a capped publish; the Redis and memory hooks read it
and, for a message bound to that publish's queue, push only below the cap or
raise :class:`QueueFull`.  The Redis backend (and with it redis-py) is
imported only when a Redis transport is used.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from celery import Celery

    from ..pool import Pool

__all__ = [
    "CAPPED_TRANSPORTS",
    "CURRENT",
    "HOOKED_TRANSPORTS",
    "CappedPush",
    "QueueFull",
    "TenantRefused",
    "check_transport",
    "hook_put",
    "install",
    "require_driver",
    "transport_of",
    "within",
]

#: kombu ``driver_type`` -> the backend module whose ``install()`` hooks ``_put``.
_HOOK_MODULES = {"redis": "redis", "memory": "memory"}
HOOKED_TRANSPORTS = frozenset(_HOOK_MODULES)
#: Transports on which a cap is exact (RabbitMQ, "amqp", enforces caps itself).
CAPPED_TRANSPORTS = frozenset({"amqp", *HOOKED_TRANSPORTS})


class QueueFull(Exception):
    """Internal: the capped push found the queue full (``depth`` ready messages)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        super().__init__(depth)


class TenantRefused(Exception):
    """Internal: the one-call push found the tenant over its limit (next token in ``wait`` s)."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        super().__init__(wait)


@dataclass(frozen=True)
class CappedPush:
    """A capped publish in progress: its queue and its cap (one per pool, reused).

    ``bucket`` (Redis only): the tenant's bucket key, interval (µs) and burst,
    for a push that spends the tenant's token in the same call.
    """

    queue: str
    cap: int
    bucket: tuple[str, bytes, bytes] | None = None
    cap_arg: bytes = field(init=False, repr=False)  # Redis ARGV[1], encoded once

    def __post_init__(self) -> None:
        object.__setattr__(self, "cap_arg", str(self.cap).encode())


#: The capped publish running on this thread or task, if any.
CURRENT: ContextVar[CappedPush | None] = ContextVar("celery_bulkhead_capped_push", default=None)


#: ``capped_put(channel, original_put, queue, message, push, **kwargs)``: push
#: below ``push.cap`` or raise :class:`QueueFull`.
CappedPut = Callable[..., Any]


def hook_put(channel_class: Any, capped_put: CappedPut) -> None:
    """Wrap a virtual transport's ``Channel._put`` once per process (idempotent).

    The wrapper does nothing unless a capped publish is in progress
    (:data:`CURRENT`) and the message goes to that publish's queue; then it
    hands the message to ``capped_put``.
    """
    original = channel_class._put
    if getattr(original, "_celery_bulkhead", False):
        return

    def _put(self: Any, queue: str, message: Any, **kwargs: Any) -> Any:
        push = CURRENT.get()
        if push is None or push.queue != queue:
            return original(self, queue, message, **kwargs)
        return capped_put(self, original, queue, message, push, **kwargs)

    _put._celery_bulkhead = True  # type: ignore[attr-defined]
    _put.__wrapped__ = original  # type: ignore[attr-defined]
    channel_class._put = _put


def within(driver: str, connection: Any, deadline: float) -> contextlib.AbstractContextManager[Any]:
    """Every socket operation of a producer's ``connection`` in the block ends by ``deadline``.

    Redis only: ``memory://`` has no sockets, and RabbitMQ's capped publishes
    use confirm connections that :mod:`.amqp` bounds itself.
    """
    if driver != "redis":
        return _NO_SOCKETS
    return _redis_within()(connection, deadline)


_NO_SOCKETS = contextlib.nullcontext()


@functools.cache
def _redis_within() -> Callable[[Any, float], contextlib.AbstractContextManager[Any]]:
    # Imported on first use (redis-py is an extra), not on every publish.
    from .redis import within as redis_within

    return redis_within


def install(driver: str) -> None:
    """Hook the ``_put`` of ``driver``'s channels, if it is a hooked transport."""
    module = _HOOK_MODULES.get(driver)
    if module is not None:
        importlib.import_module(f"{__name__}.{module}").install()


def transport_of(app: Celery) -> str | None:
    """The kombu ``driver_type`` of the app's write connection, without connecting.

    None when it cannot be told (then the first publish will say why).  A
    transport whose module cannot load for want of its driver (kombu's Redis
    transport without redis-py) is still named, from the URL's scheme.
    """
    try:
        connection = app.connection_for_write()
    except Exception:
        return _driver_from_url(app)
    try:
        return str(connection.get_transport_cls().driver_type)
    except Exception:
        return _driver_from_url(app)
    finally:
        connection.release()


#: kombu transport modules whose ``driver_type`` is not their own name.
_MODULE_DRIVERS = {"pyamqp": "amqp", "librabbitmq": "amqp"}


def _driver_from_url(app: Celery) -> str | None:
    from kombu.transport import TRANSPORT_ALIASES

    url = app.conf.broker_write_url or app.conf.broker_url or ""
    if isinstance(url, (list, tuple)):
        url = url[0] if url else ""
    scheme = str(app.conf.broker_transport or str(url).split("://", 1)[0].split("+", 1)[0])
    target = TRANSPORT_ALIASES.get(scheme.lower(), "")
    module = target.split(":", 1)[0] if isinstance(target, str) else ""
    if not module.startswith("kombu.transport."):
        return None
    tail = module.rsplit(".", 1)[1]
    return _MODULE_DRIVERS.get(tail, tail.lower())


#: Transports that need an optional driver, and the extra that installs it.
_DRIVERS = {"redis": ("redis", "redis")}


def require_driver(driver: str | None) -> None:
    """Fail now, naming the extra to install, when the transport's driver is missing."""
    needed = _DRIVERS.get(driver or "")
    if needed is None or importlib.util.find_spec(needed[0]) is not None:
        return
    module, extra = needed
    raise ConfigurationError(
        None,
        "broker_url",
        f"{driver}://...",
        f"a broker whose driver is installed: pip install 'celery-bulkhead[{extra}]'",
        detail=f"the {driver} transport needs the {module!r} package, which is not installed",
    )


def check_transport(pool: Pool, driver: str | None) -> None:
    """Refuse a capped pool on a transport that cannot cap a queue exactly."""
    if pool.max_queue is None or driver is None or driver in CAPPED_TRANSPORTS:
        return
    raise ConfigurationError(
        pool.name,
        "max_queue",
        pool.max_queue,
        "None on this broker (caps are enforced on Redis, RabbitMQ and memory://)",
        detail=f"the {driver!r} transport cannot cap a queue exactly; "
        "refusing the cap rather than ignore it",
    )
