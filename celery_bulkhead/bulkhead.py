"""The :class:`Bulkhead` facade: declares pools on a Celery app.

``Bulkhead(app, pools=[...])`` validates the pools, merges their router and
queues into the app's configuration, makes ``@app.task(bulkhead="name")``
check the pool name when the task is decorated, and registers the worker
bootstep and the ``--bulkhead-pool`` worker option used by
``celery -A app bulkhead worker``.  It is the only place that reads
``app.conf`` for pool settings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import click

from . import settings
from .admission import Admission
from .assignment import TASK_ATTRIBUTE, Assignment
from .breaker import Circuit, circuits
from .caps import check_transport, require_driver, transport_of
from .errors import ConfigurationError
from .pool import Pool, pools_from_setting
from .publishing import install_publishing, install_timeouts
from .routing import install_routing
from .tenants.limiter import Limiter

if TYPE_CHECKING:
    from celery import Celery, Task

__all__ = ["Bulkhead", "installed_on"]

logger = logging.getLogger(__name__)

_APP_ATTRIBUTE = "_celery_bulkhead"
#: The worker bootstep, by name: producers never import the worker side.
_WORKER_STEP = "celery_bulkhead.worker.step:PoolWorkerStep"
F = TypeVar("F", bound=Callable[..., Any])


def _breaker_store(state_url: str, timeout: float) -> Callable[[], Any]:
    """A factory of the breaker store: one store, shared by every circuit of the app."""
    if state_url.startswith("memory://"):
        from .breaker.memory import MemoryBreakerStore

        store: Any = MemoryBreakerStore()
    else:
        from .breaker.redis import RedisBreakerStore

        store = RedisBreakerStore(state_url, timeout)
    return lambda: store


def _trial_lease(pool: Pool) -> float:
    """How long a half-open trial may hold its lease: the task's longest run, and then some."""
    assert pool.breaker is not None
    if pool.time_limit is not None:
        return pool.time_limit + 60.0
    return max(60.0, pool.breaker.reset_timeout)


def installed_on(app: Celery) -> Bulkhead:
    """The Bulkhead declared on ``app``; a ConfigurationError if there is none."""
    bulkhead = getattr(app, _APP_ATTRIBUTE, None)
    if not isinstance(bulkhead, Bulkhead):
        raise ConfigurationError(
            None,
            "app",
            app.main,
            "an app with Bulkhead(app, ...) declared",
            detail="create the Bulkhead in the module that defines the app",
        )
    return bulkhead


class Bulkhead:
    """Pools of isolated queues and workers for one Celery app.

    Args:
        app: the Celery app.  Create the Bulkhead after the app's
            ``config_from_object`` call (it reads the configuration).
        pools: the pools, as :class:`Pool` objects or a ``{name: {setting:
            value}}`` mapping.  When omitted they are read from the
            ``bulkhead_pools`` setting (``CELERY_BULKHEAD_POOLS`` in Django).
        publish_timeout: longest time, in seconds, a pool publish keeps
            trying a broker that is down or frozen before it raises
            ``BrokerUnavailable`` (default: the ``bulkhead_publish_timeout``
            setting, else 10).  On Redis it also becomes the transport's
            ``socket_timeout`` unless the app set one.

    Raises:
        ConfigurationError: for any invalid pool, a duplicate pool or queue
            name, a task pattern claimed by two pools, or a second Bulkhead
            on the same app.
    """

    def __init__(
        self,
        app: Celery,
        pools: Iterable[Pool] | Mapping[str, Any] | None = None,
        *,
        publish_timeout: float | None = None,
    ) -> None:
        if isinstance(getattr(app, _APP_ATTRIBUTE, None), Bulkhead):
            raise ConfigurationError(
                None,
                "app",
                app.main,
                "one Bulkhead per app",
                detail="declare every pool in the same Bulkhead",
            )
        self.app = app
        self.settings = settings.read(app, pools=pools, publish_timeout=publish_timeout)
        parsed = pools_from_setting(self.settings.pools)
        self._check_unique(parsed)
        self.settings.check_ports(len(parsed))
        driver = transport_of(app)
        require_driver(driver)
        for pool in parsed:
            check_transport(pool, driver)
        self.assignment = Assignment(parsed)
        self.publish_timeout = self.settings.publish_timeout
        #: Tenant buckets and leases, when some pool has a TenantLimit.
        self.limiter: Limiter | None = None
        #: One circuit per breaker name (pools may share one downstream's breaker).
        self.circuits: dict[str, Circuit] = {}
        if any(pool.tenant is not None or pool.breaker is not None for pool in parsed):
            state_url = settings.state_url(app, self.settings, driver, parsed)
            if any(pool.tenant is not None for pool in parsed):
                self.limiter = Limiter(state_url, self.publish_timeout)
            self.circuits = circuits(
                parsed, _breaker_store(state_url, self.publish_timeout), _trial_lease
            )
        self.admission = Admission(
            app,
            self.assignment.pools,
            self.publish_timeout,
            limiter=self.limiter,
            circuits=self.circuits,
        )
        #: First metrics port: pool i (in declaration order) serves on port + i.
        self.metrics_port: int | None = self.settings.metrics_port
        self.metrics_host: str = self.settings.metrics_host
        self._install()
        setattr(app, _APP_ATTRIBUTE, self)

    # -- declaration -------------------------------------------------------

    @staticmethod
    def _check_unique(pools: tuple[Pool, ...]) -> None:
        if not pools:
            raise ConfigurationError(None, settings.POOLS, [], "at least one pool")
        names: set[str] = set()
        queues: dict[str, str] = {}
        for pool in pools:
            if pool.name in names:
                raise ConfigurationError(pool.name, "name", pool.name, "a name no other pool uses")
            names.add(pool.name)
            if pool.queue in queues:
                raise ConfigurationError(
                    pool.name,
                    "queue",
                    pool.queue,
                    "a queue no other pool uses",
                    detail=f"pool {queues[pool.queue]!r} uses it",
                )
            queues[pool.queue] = pool.name

    def _install(self) -> None:
        app = self.app
        install_routing(app, self.assignment)
        install_timeouts(app, self.publish_timeout)
        install_publishing(app, self.admission)
        # A later app.config_from_object() reloads the configuration from its
        # source and would forget the merged routes and queues: merge again.
        app.on_after_configure.connect(self._reinstall, weak=False)
        self._wrap_task_decorator()
        self._check_registered_tasks()
        app.steps["worker"].add(_WORKER_STEP)
        app.user_options["worker"].add(
            click.Option(
                ["--bulkhead-metrics-port"],
                type=int,
                default=None,
                metavar="PORT",
                help="Serve the pool's Prometheus metrics on this port.",
            )
        )
        app.user_options["worker"].add(
            click.Option(
                ["--bulkhead-metrics-host"],
                default=None,
                metavar="ADDRESS",
                help="Address the metrics listen on (default 127.0.0.1).",
            )
        )
        app.user_options["worker"].add(
            click.Option(
                ["--bulkhead-pool"],
                default=None,
                metavar="POOL",
                help="Serve this celery-bulkhead pool (set by `celery bulkhead worker`).",
            )
        )

    def _reinstall(self, sender: Any = None, **kwargs: Any) -> None:
        install_routing(self.app, self.assignment)
        install_timeouts(self.app, self.publish_timeout)

    def _wrap_task_decorator(self) -> None:
        app = self.app
        original = app.task
        assignment = self.assignment

        def assign(fun: Any, options: dict[str, Any]) -> None:
            # The name Celery will give the task (Celery._task_from_fun).
            name = options.get("name") or app.gen_task_name(fun.__name__, fun.__module__)
            # An unknown pool fails here, at decoration, naming the task and its module.
            pool = assignment.assign(
                name, options[TASK_ATTRIBUTE], module=fun.__module__, function=fun
            )
            if options.get("queue") is not None:
                # Celery lets a task's own queue= beat every router: the task
                # would leave its pool's queue, workers, cap and limits.
                raise ConfigurationError(
                    pool.name,
                    "queue",
                    options["queue"],
                    "no queue= on a task in a pool (it is routed to the pool's queue)",
                    detail=f"task {name!r} (module {fun.__module__})",
                )

        def task(*args: Any, **options: Any) -> Any:
            if options.get(TASK_ATTRIBUTE) is None:
                return original(*args, **options)
            if len(args) == 1 and callable(args[0]):  # @app.task(fun, bulkhead=...)
                assign(args[0], options)
                return original(*args, **options)
            decorate = original(*args, **options)

            def decorator(fun: Any) -> Any:
                assign(fun, options)
                return decorate(fun)

            return decorator

        task.__doc__ = original.__doc__
        task.__wrapped__ = original  # type: ignore[attr-defined]
        # An instance attribute: only this app's decorator is wrapped.
        app.task = task  # type: ignore[method-assign]

    def _check_registered_tasks(self) -> None:
        # Tasks decorated before the Bulkhead existed are checked now when
        # they are already bound, and at worker start otherwise.
        # vars(): the registry as it is, without finalizing the app.
        for name, task in list(vars(self.app).get("_tasks", {}).items()):
            self.assignment.resolve(name, task)

    # -- public API ----------------------------------------------------------

    @property
    def pools(self) -> tuple[Pool, ...]:
        """The declared pools, in declaration order."""
        return tuple(self.assignment.pools.values())

    def pool(self, name: str) -> Pool:
        """The pool called ``name``; ConfigurationError when there is none."""
        return self.assignment.pool(name, setting="pool")

    def pool_for(self, task_name: str) -> Pool | None:
        """The pool a task (by name) is routed to, or None for Celery's own routing."""
        return self.assignment.resolve(task_name, self.app.tasks.get(task_name))

    def task(self, *args: Any, pool: str, **options: Any) -> Any:
        """``@bulkhead.task(pool="name", **celery_options)``: a task in a pool.

        The same as ``@app.task(bulkhead="name", ...)``; the pool name is
        checked immediately.
        """
        self.pool(pool)
        return self.app.task(*args, **{TASK_ATTRIBUTE: pool, **options})

    def tasks_in(self, pool: Pool | str) -> Iterator[Task]:  # type: ignore[type-arg]
        """The registered tasks assigned to ``pool`` (finalizes the app)."""
        target = self.pool(pool) if isinstance(pool, str) else pool
        for name, task in sorted(self.app.tasks.items()):
            if self.assignment.resolve(name, task) is target:
                yield task

    def circuit_of(self, pool: Pool) -> Circuit | None:
        """The circuit breaker guarding ``pool``, if it has one."""
        if pool.breaker is None:
            return None
        return self.circuits[pool.breaker.name or pool.name]

    def metrics_port_of(self, pool: Pool) -> int | None:
        """The metrics port of ``pool``'s worker: ``bulkhead_metrics_port`` + its index."""
        return self.settings.metrics_port_of(self.pools.index(pool))

    def validate_tasks(self) -> None:
        """Check every registered task's pool assignment (finalizes the app).

        Raises ConfigurationError for a task naming an unknown pool or a name
        matched by two pools' patterns.  ``celery bulkhead worker`` calls it
        before starting anything.
        """
        for name, task in sorted(self.app.tasks.items()):
            self.assignment.resolve(name, task)

    def __repr__(self) -> str:
        return f"<Bulkhead app={self.app.main!r} pools={[p.name for p in self.pools]}>"
