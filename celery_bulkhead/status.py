"""What ``celery bulkhead status`` reports: per pool, from the broker and the workers.

Depth comes from the broker (:func:`~celery_bulkhead.depth.queue_depth`:
on Redis every priority sub-queue, under the key prefix); consumers and in-flight tasks
come from the workers' remote-control replies (``inspect active_queues`` and
``inspect active``), so a node that does not answer within the timeout
counts as absent.

The broker is reached first, once, over a connection whose connect timeout is the
status timeout and which is never retried: when the broker cannot be reached, nothing
else is asked (Celery's remote control would retry it for seconds) and every pool's
depth, consumers and in-flight count are unknown (``None``), with the reason in
:attr:`Report.broker_error`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from kombu.exceptions import OperationalError

from .depth import queue_depth
from .routing import consumed_queues

if TYPE_CHECKING:
    from celery import Celery
    from kombu import Connection

    from .pool import Pool

__all__ = ["PoolStatus", "Report", "collect", "report", "tally", "unknown"]


@dataclass(frozen=True)
class PoolStatus:
    """One pool's row.  ``None`` means unknown (the broker or the workers could not be read)."""

    pool: str
    queue: str
    depth: int | None
    cap: int | None
    consumers: tuple[str, ...] | None
    inflight: int | None
    concurrency: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Report:
    """Every selected pool's row, and why the broker could not be read (None when it could)."""

    pools: tuple[PoolStatus, ...]
    broker_error: str | None = None


def tally(
    pools: Iterable[Pool],
    depths: Mapping[str, int | None],
    queues_by_node: Mapping[str, Any] | None,
    active_by_node: Mapping[str, Any] | None,
) -> list[PoolStatus]:
    """The rows, from depths by queue and the replies of ``inspect active_queues``/``active``.

    A pool's consumers are the nodes consuming its queue; its in-flight tasks are
    those running on them that were delivered from one of the queues the pool
    consumes (its queue and, when capped, ``<queue>.continue``), matched exactly:
    queue ``x.pay`` does not count the tasks of queue ``x.payments``.  A reply
    that is ``None`` was not received: what it would tell is ``None`` too.
    """
    rows = []
    for pool in pools:
        consumers: tuple[str, ...] | None = None
        inflight: int | None = None
        if queues_by_node is not None:
            consumers = tuple(
                sorted(
                    node
                    for node, queues in queues_by_node.items()
                    if any(q.get("name") == pool.queue for q in queues or ())
                )
            )
        if consumers is not None and active_by_node is not None:
            ours = set(consumed_queues(pool))
            inflight = sum(
                1
                for node in consumers
                for request in active_by_node.get(node) or ()
                if (request.get("delivery_info") or {}).get("routing_key") in ours
            )
        rows.append(
            PoolStatus(
                pool.name,
                pool.queue,
                depths.get(pool.queue),
                pool.max_queue,
                consumers,
                inflight,
                pool.concurrency,
            )
        )
    return rows


def unknown(pools: Iterable[Pool], reason: str) -> Report:
    """A report that knows only the configuration: the broker could not be read."""
    return Report(tuple(tally(pools, {}, None, None)), reason)


def report(app: Celery, pools: Sequence[Pool], timeout: float) -> Report:
    """Read the broker and ask the workers; give up on the broker after about ``timeout`` s.

    With the broker unreachable, returns :func:`unknown` rows after one
    connection attempt (refused at once, or timed out after ``timeout``).
    """
    connection = _connection(app, timeout)
    unreachable: tuple[type[BaseException], ...] = (
        OperationalError,
        OSError,
        *connection.connection_errors,
        *connection.channel_errors,
    )
    try:
        try:
            # One attempt, bounded by the connect timeout: no retry loop.
            connection.ensure_connection(max_retries=0)
        except unreachable as exc:
            return unknown(pools, _reason(connection, exc))
        depths = {pool.queue: _depth(connection, pool.queue) for pool in pools}
        try:
            queues_by_node: dict[str, Any] = (
                app.control.inspect(timeout=timeout, connection=connection).active_queues() or {}
            )
            ours = {pool.queue for pool in pools}
            nodes = sorted(
                node
                for node, queues in queues_by_node.items()
                if any(q.get("name") in ours for q in queues or ())
            )
            active_by_node: dict[str, Any] = {}
            if nodes:
                # Asked of the consuming nodes only, so it returns as soon as they answer.
                active_by_node = (
                    app.control.inspect(
                        timeout=timeout, connection=connection, destination=nodes
                    ).active()
                    or {}
                )
        except unreachable as exc:
            rows = tally(pools, depths, None, None)
            return Report(tuple(rows), _reason(connection, exc))
        return Report(tuple(tally(pools, depths, queues_by_node, active_by_node)))
    finally:
        connection.release()


def collect(app: Celery, pools: list[Pool], timeout: float) -> list[PoolStatus]:
    """The rows of :func:`report` (``None`` for what could not be read)."""
    return list(report(app, pools, timeout).pools)


def _connection(app: Celery, timeout: float) -> Connection:
    connection = app.connection_for_read(connect_timeout=timeout)
    if connection.transport.driver_type == "redis":
        # kombu's Redis transport ignores connect_timeout; its sockets take these
        # (read when a channel is created, so they apply from the first connect).
        # A Redis that accepts the connection but does not answer is then given
        # up on after ``timeout`` too, instead of the app's own socket timeout.
        connection.transport_options = {
            **(connection.transport_options or {}),
            "socket_connect_timeout": timeout,
            "socket_timeout": timeout,
        }
    return connection


def _depth(connection: Connection, queue: str) -> int | None:
    try:
        return queue_depth(connection, queue)
    except Exception:
        return None


def _reason(connection: Connection, exc: BaseException) -> str:
    """Why the broker could not be read, with the broker's URL but never its password."""
    reason = str(exc) or type(exc).__name__
    password = connection.password
    if isinstance(password, str) and password:
        reason = reason.replace(password, "**")
    return f"broker unreachable at {connection.as_uri()}: {reason}"
