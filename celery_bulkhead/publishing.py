"""Where admission plugs into Celery's publish path.

Celery signals cannot veto a publish (``Signal.send`` swallows handler
exceptions), so admission sits in the publish path itself, through two
instance-level hooks on the app (no global patching of Celery):

* ``app.amqp.send_task_message`` — Celery's sender, called by every publish
  once the message is built and routed — is wrapped to run
  :meth:`Admission.send`;
* ``app.send_task`` — which every ``delay``/``apply_async``/canvas publish
  goes through — turns a drop into a :class:`DroppedResult` and marks other
  results with ``dropped = False``.  Only an app with an ``on_full="drop"``
  pool needs this; any other app's results say ``dropped = False`` through
  the app's own ``AsyncResult`` class.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from kombu.exceptions import LimitExceeded

from .admission import STARTED, Admission, Dropped
from .errors import BrokerUnavailable
from .metrics import count_admission
from .results import DroppedResult
from .routing import ROUTED_POOL

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["install_publishing", "redis_broker"]


def redis_broker(app: Celery) -> bool:
    url = app.conf.broker_url or app.conf.broker_write_url or ""
    if isinstance(url, (list, tuple)):
        url = url[0] if url else ""
    scheme = str(url).split("://", 1)[0].lower()
    return scheme in ("redis", "rediss", "redis+socket", "sentinel")


def install_timeouts(app: Celery, publish_timeout: float) -> None:
    """Bound Redis socket operations, unless the app set its own.

    kombu's Redis transport has no socket timeout by default, so a frozen
    Redis hangs every publisher forever.
    """
    if not redis_broker(app):
        return
    options = dict(app.conf.broker_transport_options or {})
    options.setdefault("socket_timeout", publish_timeout)
    options.setdefault("socket_connect_timeout", publish_timeout)
    app.conf.broker_transport_options = options


class _Producer:
    """``app.producer_or_acquire``: a pool task's wait for a producer is part of its deadline.

    Celery takes a producer from the app's pool (``broker_pool_limit``) before
    admission runs, and waits for one with no timeout: with more publishing
    threads than producers and a frozen broker, each waiter used to start its
    own full ``publish_timeout`` only once a producer came free.  Here the
    publish's start is recorded before the wait, admission's deadline counts
    from it, and a pool task waits at most ``publish_timeout`` for a producer
    (then :class:`BrokerUnavailable`).  Tasks in no pool wait as Celery does.
    """

    __slots__ = ("_acquired", "_app", "_given", "_timeout", "_token")

    def __init__(self, app: Celery, producer: Any, timeout: float) -> None:
        self._app = app
        self._given = producer
        self._timeout = timeout
        self._acquired: Any = None

    def __enter__(self) -> Any:
        self._token = STARTED.set(time.monotonic())
        if self._given is not None:
            return self._given
        pool = ROUTED_POOL.get()
        try:
            if pool is None:
                self._acquired = self._app.producer_pool.acquire(block=True)
            else:
                self._acquired = self._app.producer_pool.acquire(block=True, timeout=self._timeout)
        except LimitExceeded as exc:
            STARTED.reset(self._token)
            assert pool is not None
            count_admission(pool, "error", "broker_unavailable")
            raise BrokerUnavailable(
                pool,
                self._timeout,
                f"no producer of the app's pool (broker_pool_limit="
                f"{self._app.conf.broker_pool_limit}) came free in time",
            ) from exc
        except BaseException:
            STARTED.reset(self._token)
            raise
        return self._acquired

    def __exit__(self, *exc_info: Any) -> None:
        try:
            if self._acquired is not None:
                self._acquired.release()
        finally:
            STARTED.reset(self._token)


def install_publishing(app: Celery, admission: Admission) -> None:
    amqp = app.amqp
    timeout = admission.publish_timeout

    def producer_or_acquire(producer: Any = None) -> _Producer:
        return _Producer(app, producer, timeout)

    producer_or_acquire.__doc__ = app.producer_or_acquire.__doc__
    app.producer_or_acquire = producer_or_acquire  # type: ignore[method-assign,assignment]
    original_sender: list[Any] = []

    def send_task_message(producer: Any, name: str, message: Any, **options: Any) -> Any:
        if not original_sender:
            # Built on first use, from the configuration as it is then.
            original_sender.append(amqp._create_task_sender())  # type: ignore[attr-defined]
        return admission.send(original_sender[0], producer, name, message, options)

    # A cached_property on AMQP: an instance attribute replaces Celery's sender.
    vars(amqp)["send_task_message"] = send_task_message

    if not any(
        pool.on_full == "drop" or (pool.tenant is not None and pool.tenant.on_limited == "drop")
        for pool in admission.by_queue.values()
    ):
        # Nothing can be dropped: every result of this app says so, and
        # publishes skip the wrapper below (a frame that repacks ~20 arguments).
        app.AsyncResult.dropped = False  # type: ignore[attr-defined]
        return

    original_send_task = app.send_task

    def send_task(*args: Any, **kwargs: Any) -> Any:
        try:
            result = original_send_task(*args, **kwargs)
        except Dropped as dropped:
            return DroppedResult(dropped.error.task_id or "", dropped.error, app=app)
        result.dropped = False  # type: ignore[attr-defined]
        return result

    send_task.__doc__ = original_send_task.__doc__
    send_task.__wrapped__ = original_send_task  # type: ignore[attr-defined]
    app.send_task = send_task  # type: ignore[method-assign]
