"""Exact queue caps on RabbitMQ: enforced by the broker, observed through confirms.

A capped pool's queue is declared with ``x-max-length`` and
``x-overflow: reject-publish``, so RabbitMQ itself refuses a message that
would exceed the cap, whatever the number of producers.  Capped publishes go
through a separate connection pool in publisher-confirm mode (the app's own
publishes keep Celery's defaults), so a refusal arrives as a ``basic.nack``
and becomes :class:`~celery_bulkhead.PoolFull` instead of a silent drop.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from celery import Celery

    from ..pool import Pool

__all__ = ["ConfirmingProducers", "mismatch_error"]

#: ``connect(connection, deadline)``: makes sure a kombu connection is up by then.
Connect = Callable[[Any, float], None]

# RabbitMQ's PRECONDITION_FAILED texts, e.g. "inequivalent arg 'x-max-length' for
# queue 'q' in vhost '/': received the value '2' of type 'signedint' but current
# is the value '50' of type 'signedint'", or "... but current is none" when the
# existing queue has no such argument.
_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for queue '(?P<queue>[^']+)'.*?"
    r"received (?:the value )?'?(?P<received>[^'\s]*)'?.*?"
    r"but current is (?:the value )?(?:'(?P<current>[^']*)'|(?P<none>none))"
)


class ConfirmingProducers:
    """Producers on publisher-confirm connections, created lazily and after fork."""

    def __init__(self, app: Celery, connect_timeout: float) -> None:
        self.app = app
        self.connect_timeout = connect_timeout
        self._pid: int | None = None
        self._pool: Any = None

    def _connections(self) -> Any:
        if self._pid != os.getpid() or self._pool is None:
            options = dict(self.app.conf.broker_transport_options or {})
            options["confirm_publish"] = True
            # Each connection attempt (TCP and AMQP handshake) within the publish timeout.
            connection = self.app.connection_for_write(
                transport_options=options, connect_timeout=self.connect_timeout
            )
            self._pool = connection.Pool(limit=self.app.conf.broker_pool_limit or 10)
            self._pid = os.getpid()
        return self._pool

    @contextmanager
    def acquire(self, deadline: float, connect: Connect) -> Iterator[Any]:
        """A producer on a connected confirm-mode connection, by ``deadline`` (monotonic).

        ``connect(connection, deadline)`` (re)connects within the deadline.
        Every later step on the connection (opening the channel, a declare,
        the publish, the confirm wait, a passive declare, a channel's close)
        reads and writes within the time left until the same deadline: a
        broker that freezes at any point fails the step instead of hanging
        it, and no step after a slow one gets more than is left.  A broken
        connection is closed on the way out, so the next use reconnects.
        """
        timeout = max(deadline - time.monotonic(), 0.001)
        connection = self._connections().acquire(block=True, timeout=timeout)
        try:
            connect(connection, deadline)
            _bound(connection, deadline)
            yield self._producer(connection)
        except BaseException:
            # After a channel or connection error the default channel is gone
            # for good (kombu does not reopen it): close, so reuse reconnects.
            connection.collect()
            raise
        finally:
            connection.release()

    def _producer(self, connection: Any) -> Any:
        """The producer on ``connection``'s default channel, kept while that channel lives.

        Made once per channel, not per publish (kombu's own producer pool
        does the same): after a channel or connection error the channel is
        a new one, and so is the producer.
        """
        channel = connection.default_channel
        held = connection.__dict__.get(_PRODUCER)
        if held is None or held[0] is not channel:
            producer = self.app.amqp.Producer(channel, auto_declare=False)
            held = connection.__dict__[_PRODUCER] = (channel, producer)
        return held[1]

    def depth(self, queue: str, deadline: float, connect: Connect) -> int:
        """Ready messages in ``queue`` (a passive declare), by ``deadline``."""
        with self.acquire(deadline, connect) as producer, producer.connection.channel() as channel:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)


def _bound(connection: Any, deadline: float) -> None:
    """Bound every read and write on the connection by ``deadline`` (monotonic).

    A socket timeout counts per operation, not per publish: set once, a step
    that starts late (the channel's close after a passive declare timed out,
    say) would wait the whole timeout again.  py-amqp sets the socket's
    timeout around each frame it waits for or writes (``having_timeout``), so
    that is where each step gets at most the time left, whatever it asks for.
    """
    transport: Any = getattr(connection.connection, "transport", None)
    sock = getattr(transport, "sock", None)
    if sock is None:
        raise TimeoutError("the confirm connection has no socket")  # closed meanwhile
    limit: _Deadline | None = transport.__dict__.get(_DEADLINE)
    if limit is None:
        # Per transport, and a reconnect makes a new one: installed once per connection.
        limit = transport.__dict__[_DEADLINE] = _Deadline(transport.having_timeout)
        transport.having_timeout = limit.having_timeout
    limit.at = deadline
    sock.settimeout(max(deadline - time.monotonic(), 0.001))


_DEADLINE = "_celery_bulkhead_deadline"
#: py-amqp's ``Transport.having_timeout``: a context in which the socket has that timeout.
_HavingTimeout = Callable[[float | None], AbstractContextManager[Any]]
_PRODUCER = "_celery_bulkhead_producer"


class _Deadline:
    """The deadline of the publish using a confirm connection, applied to each of its steps."""

    __slots__ = ("_having_timeout", "at")

    def __init__(self, having_timeout: _HavingTimeout) -> None:
        self._having_timeout = having_timeout
        self.at = 0.0

    def having_timeout(self, timeout: float | None) -> AbstractContextManager[Any]:
        # py-amqp's own context, given the time left: no second generator per frame.
        left = max(self.at - time.monotonic(), 0.001)
        return self._having_timeout(left if timeout is None else min(timeout, left))


def mismatch_error(pool: Pool, exc: BaseException) -> ConfigurationError | None:
    """A ConfigurationError for RabbitMQ's PRECONDITION_FAILED on a queue's arguments."""
    text = str(exc)
    found = _INEQUIVALENT.search(text)
    if found is None:
        return None
    current = "(not set)" if found["none"] else found["current"]
    return ConfigurationError(
        pool.name,
        "max_queue",
        pool.max_queue,
        "queue arguments equal to the existing queue's, or a queue of a new name",
        detail=(
            f"queue {found['queue']!r} already exists with {found['arg']}={current}; "
            f"this app declares {found['arg']}={found['received']}; RabbitMQ cannot change "
            "arguments of an existing queue: delete it, rename the pool's queue=, or use a policy"
        ),
    )
