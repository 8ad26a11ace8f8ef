"""Every ``bulkhead_*`` setting: its name, default and allowed range, read in one place.

=============================  =======================  =======================================
setting (Django: ``CELERY_``    default                  allowed
+ upper case)
=============================  =======================  =======================================
``bulkhead_pools``             (required unless given   ``{name: {setting: value}}`` or a list
                               to ``Bulkhead``)         of ``Pool`` objects
``bulkhead_publish_timeout``   10                       seconds, > 0 and <= 3600
``bulkhead_metrics_port``      None (no metrics HTTP)   a TCP port 1-65535; with N pools the
                                                        last pool's port + N - 1 <= 65535
``bulkhead_metrics_host``      ``"127.0.0.1"``          a non-empty host name or address
``bulkhead_state_url``         the broker's URL when    ``redis://``, ``rediss://`` or
                               it is Redis; in-process  ``unix://`` URL of the Redis that holds
                               on ``memory://``         tenant buckets and leases (required for
                                                        a tenant limit on RabbitMQ)
=============================  =======================  =======================================

:func:`read` turns an app's configuration into a frozen :class:`Settings`;
nothing else in the package reads ``app.conf`` for these names.  The value
checkers here (:func:`seconds`, :func:`whole`) are shared with the pool
settings, so a range is written once and every bad value raises the same
:class:`~celery_bulkhead.ConfigurationError` naming the pool (if any), the
setting, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "MAX_PORT",
    "MAX_PUBLISH_TIMEOUT",
    "Settings",
    "read",
    "seconds",
    "state_url",
    "whole",
]

POOLS = "bulkhead_pools"
PUBLISH_TIMEOUT = "bulkhead_publish_timeout"
METRICS_PORT = "bulkhead_metrics_port"
METRICS_HOST = "bulkhead_metrics_host"
STATE_URL = "bulkhead_state_url"
_STATE_SCHEMES = ("redis://", "rediss://", "unix://", "memory://")

DEFAULT_PUBLISH_TIMEOUT = 10.0
#: A publish may keep trying a broker for at most an hour; socket timeouts
#: beyond that overflow on some platforms and help nobody.
MAX_PUBLISH_TIMEOUT = 3600.0
MAX_PORT = 65535


def seconds(
    pool: str | None,
    setting: str,
    value: Any,
    *,
    maximum: float,
    optional: bool = False,
) -> float | None:
    """``value`` as float seconds in ``(0, maximum]``; None only when ``optional``."""
    if value is None and optional:
        return None
    allowed = f"a number of seconds > 0 and <= {maximum:g}"
    if optional:
        allowed += " or None (no limit)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(pool, setting, value, allowed)
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float (10**400)
        raise ConfigurationError(pool, setting, value, allowed) from None
    if not math.isfinite(number) or not 0 < number <= maximum:
        raise ConfigurationError(pool, setting, value, allowed)
    return number


def whole(
    pool: str | None,
    setting: str,
    value: Any,
    *,
    minimum: int = 1,
    maximum: int,
    optional: bool = False,
) -> int | None:
    """``value`` as an int in ``[minimum, maximum]``; None only when ``optional``."""
    if value is None and optional:
        return None
    allowed = f"an int >= {minimum} and <= {maximum}"
    if optional:
        allowed += " or None (no limit)"
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigurationError(pool, setting, value, allowed)
    return value


@dataclass(frozen=True)
class Settings:
    """An app's ``bulkhead_*`` settings, validated (see the module docstring)."""

    pools: Any
    publish_timeout: float = DEFAULT_PUBLISH_TIMEOUT
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    state_url: str | None = None

    def metrics_port_of(self, index: int) -> int | None:
        """The metrics port of the pool declared at ``index``."""
        return None if self.metrics_port is None else self.metrics_port + index

    def check_ports(self, pool_count: int) -> None:
        """Every pool's metrics port (``port + index``) must be a TCP port."""
        if self.metrics_port is None or self.metrics_port + pool_count - 1 <= MAX_PORT:
            return
        raise ConfigurationError(
            None,
            METRICS_PORT,
            self.metrics_port,
            f"a TCP port <= {MAX_PORT - pool_count + 1} with {pool_count} pools "
            f"(pool i serves on port + i, up to {MAX_PORT})",
        )


def _conf(app: Celery, name: str, default: Any) -> Any:
    value = app.conf.get(name)
    return default if value is None else value


def read(
    app: Celery,
    *,
    pools: Any = None,
    publish_timeout: float | None = None,
) -> Settings:
    """The app's settings, with ``Bulkhead(...)``'s own arguments taking precedence."""
    source = pools if pools is not None else app.conf.get(POOLS)
    if source is None:
        raise ConfigurationError(
            None,
            POOLS,
            None,
            "pools=[Pool(...)] or the bulkhead_pools setting",
            detail="no pools declared",
        )
    timeout = seconds(
        None,
        PUBLISH_TIMEOUT,
        publish_timeout
        if publish_timeout is not None
        else _conf(app, PUBLISH_TIMEOUT, DEFAULT_PUBLISH_TIMEOUT),
        maximum=MAX_PUBLISH_TIMEOUT,
    )
    port = app.conf.get(METRICS_PORT)
    if port is not None:
        try:
            whole(None, METRICS_PORT, port, maximum=MAX_PORT)
        except ConfigurationError as exc:
            raise ConfigurationError(
                None, METRICS_PORT, port, exc.allowed + " or None (no metrics endpoint)"
            ) from None
    host = _conf(app, METRICS_HOST, "127.0.0.1")
    if not isinstance(host, str) or not host.strip():
        raise ConfigurationError(None, METRICS_HOST, host, "a host name or IP address")
    state = app.conf.get(STATE_URL)
    if state is not None and (
        not isinstance(state, str) or not state.lower().startswith(_STATE_SCHEMES)
    ):
        raise ConfigurationError(
            None,
            STATE_URL,
            _redacted(state),
            "a redis://, rediss:// or unix:// URL (or memory:// in tests), or None",
        )
    assert timeout is not None
    return Settings(
        pools=source,
        publish_timeout=timeout,
        metrics_port=port,
        metrics_host=host,
        state_url=state,
    )


def state_url(app: Celery, conf: Settings, driver: str | None, pools: Any) -> str:
    """Where tenant state lives: the setting, else the broker's Redis, else in-process."""
    if conf.state_url is not None:
        return conf.state_url
    if driver == "memory":
        return "memory://"
    url = app.conf.broker_write_url or app.conf.broker_url or ""
    if isinstance(url, (list, tuple)):
        url = url[0] if url else ""
    url = str(url).split(";", 1)[0]
    if driver == "redis" and url.lower().startswith(("redis://", "rediss://", "unix://")):
        return url
    pool = next(p for p in pools if p.tenant is not None or p.breaker is not None)
    what = "a tenant limit" if pool.tenant is not None else "a breaker"
    raise ConfigurationError(
        pool.name,
        STATE_URL,
        None,
        "the URL of a Redis for shared state (redis://host:port/db)",
        detail=f"{what} keeps its state in Redis, and this broker is not one: "
        "set bulkhead_state_url (Django: CELERY_BULKHEAD_STATE_URL)",
    )


def _redacted(url: Any) -> Any:
    """A URL without its password, for an error message."""
    if not isinstance(url, str) or "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
