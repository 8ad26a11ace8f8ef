"""``celery bulkhead check``: do task routes, pools and declared queues agree?

Each rule, and why it matters, is listed in docs/sizing.md ("Checking the
topology").  :func:`topology` returns the findings; the command prints them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery.app.routes import MapRoute, Router, prepare
from kombu import Queue

from . import settings
from .caps import check_transport, transport_of
from .errors import ConfigurationError
from .routing import BulkheadRouter, consumed_queues

if TYPE_CHECKING:
    from .bulkhead import Bulkhead

__all__ = ["Finding", "topology"]


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" or "warning"
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.code}: {self.message}"


def _destination(route: Any) -> str | None:
    """The queue (or pool exchange) a route sends to, by name."""
    if isinstance(route, Mapping):
        route = route.get("queue") or route.get("exchange")
    name = getattr(route, "name", route)  # a kombu Queue or Exchange, or a name
    return name if isinstance(name, str) and name else None


def _routed(router: Router, name: str, task: Any) -> str | None:
    try:
        return _destination(router.lookup_route(name, (), {}, {}, task))
    except Exception:  # a router that needs the call's arguments cannot be judged here
        return None


def _declared(queues: Any) -> set[str]:
    if isinstance(queues, Mapping):
        return {q.name if isinstance(q, Queue) else str(k) for k, q in queues.items()}
    return {q.name for q in queues or () if isinstance(q, Queue)}


def topology(app: Any, bulkhead: Bulkhead) -> list[Finding]:
    """Every finding of ``check`` for an app with a Bulkhead."""
    found: list[Finding] = []

    def add(severity: str, code: str, *message: str) -> None:
        found.append(Finding(severity, code, "".join(message)))

    pools = bulkhead.pools
    owner = {queue: pool for pool in pools for queue in consumed_queues(pool)}
    conf = app.conf
    routes = conf.task_routes
    entries = list(routes) if isinstance(routes, (list, tuple)) else [routes]
    if not any(isinstance(entry, BulkheadRouter) for entry in entries):
        add(
            "error",
            "router-missing",
            "task_routes was replaced after Bulkhead(app): pool ",
            "tasks are not routed to their pools",
        )
    own = [e for e in entries if e is not None and not isinstance(e, BulkheadRouter)]
    router = Router(prepare(own), app=app)
    declared = _declared(conf.task_queues)
    for queue, pool in owner.items():
        if queue not in declared:
            add(
                "error",
                "queue-not-declared",
                f"queue {queue!r} of pool {pool.name!r} is not ",
                "in task_queues: workers would declare it without the pool's exchange and cap",
            )
    driver = transport_of(app)
    for pool in pools:
        try:
            check_transport(pool, driver)
        except ConfigurationError as exc:
            add("error", "transport", f"{exc}, with the broker as configured now")
    if any(pool.tenant is not None or pool.breaker is not None for pool in pools):
        try:
            settings.state_url(app, settings.read(app, pools=pools), driver, pools)
        except ConfigurationError as exc:
            add("error", "state-url", f"{exc}, with the broker as configured now")
    assigned: dict[str, list[str]] = {pool.name: [] for pool in pools}
    for name, task in sorted(app.tasks.items()):
        if name.startswith("celery."):
            continue
        try:
            home = bulkhead.assignment.resolve(name, task)
        except ConfigurationError as exc:
            add("error", "unknown-pool", str(exc))
            continue
        if home is not None:
            assigned[home.name].append(name)
        sources: list[tuple[str, Any]] = [
            ("task_routes", _routed(router, name, task)),
            ("its queue= option", getattr(task, "queue", None)),
        ]
        for source, queue in sources:
            target = owner.get(queue) if isinstance(queue, str) else None
            if home is None and target is not None:
                add(
                    "error",
                    "route-into-pool",
                    f"task {name!r} is in no pool, but {source} ",
                    f"sends it to queue {queue!r} of pool {target.name!r}, where it takes the ",
                    f"pool's slots: assign it (bulkhead={target.name!r}) or route it elsewhere",
                )
            elif home is None or queue is None or queue in consumed_queues(home):
                continue
            elif source != "task_routes":
                add(
                    "error",
                    "queue-overrides-pool",
                    f"task {name!r} is in pool {home.name!r}, ",
                    f"but its queue={queue!r} option wins over the pool's router: it is ",
                    f"published to {queue!r}; remove the option",
                )
            else:
                other = "" if target is None else f" of pool {target.name!r}"
                add(
                    "warning",
                    "shadowed-route",
                    f"task {name!r} is in pool {home.name!r}: its ",
                    f"task_routes entry (queue {queue!r}{other}) is never used; remove it",
                )
    for entry in own:
        for key, value in entry.items() if isinstance(entry, Mapping) else ():
            route = MapRoute({key: value})
            queue = _destination(value) or ""
            if queue in owner and not any(route(name) for name in app.tasks):
                add(
                    "warning",
                    "route-into-pool",
                    f"task_routes entry {key!r} sends tasks to ",
                    f"queue {queue!r} of pool {owner[queue].name!r} but matches no registered ",
                    "task: the pool's workers would not know a task sent by that name",
                )
    for pool_name, names in assigned.items():
        if not names:
            add(
                "warning",
                "empty-pool",
                f"pool {pool_name!r} has no registered task (none ",
                f"with bulkhead={pool_name!r}, none matching its tasks= patterns)",
            )
    return found
