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

from typing import TYPE_CHECKING, Any

from .admission import Admission, Dropped
from .results import DroppedResult

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


def install_publishing(app: Celery, admission: Admission) -> None:
    amqp = app.amqp
    original_sender: list[Any] = []

    def send_task_message(producer: Any, name: str, message: Any, **options: Any) -> Any:
        if not original_sender:
            # Built on first use, from the configuration as it is then.
            original_sender.append(amqp._create_task_sender())  # type: ignore[attr-defined]
        return admission.send(original_sender[0], producer, name, message, options)

    # A cached_property on AMQP: an instance attribute replaces Celery's sender.
    vars(amqp)["send_task_message"] = send_task_message

    if not any(pool.on_full == "drop" for pool in admission.by_queue.values()):
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
