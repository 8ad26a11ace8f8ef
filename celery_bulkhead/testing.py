"""Testing your own app with bulkheads on, or deterministically off.

Installed as a pytest plugin (the ``pytest11`` entry point), so its fixtures
are there in any suite that has celery-bulkhead installed; the helpers are
plain functions and context managers that work outside pytest too.  Nothing
here changes anything until it is called: importing it connects nowhere and
loads neither the worker side nor redis-py.

**Bulkheads on.**  With ``broker_url="memory://"`` caps, tenant limits and
breakers work in your test process as in production (caps exact under a
lock, tenant and breaker state in-process); on a real Redis they use the
same Lua calls as production.

* :func:`pool_worker` / fixture ``bulkhead_worker``: a real worker for one
  pool, in a thread of the test process (built on Celery's
  ``celery.contrib.testing.worker.start_worker``), consuming only the pool's
  queues, with its settings and its bootstep, as ``celery bulkhead worker
  --pool NAME`` would run it.
* :func:`fill_pool` and :func:`drain`: put a pool at its cap with messages
  that are not tasks (nothing runs), and empty it again.
* :func:`expect_pool_full`, :func:`expect_tenant_limited`,
  :func:`expect_circuit_open` (``pytest.raises``-style) and
  :func:`assert_pool_full`, :func:`assert_tenant_limited` (which also accept
  a ``DroppedResult``): check a refusal and get the error.
* :func:`trip_breaker`, :func:`reset_breaker`, :func:`reset_tenant`: put the
  shared state where a test wants it.

**Bulkheads off.**  :func:`bulkheads_disabled` (one app) and
:func:`set_enabled` (every app of the process; fixture ``bulkheads_disabled``
for one test) make every publish go straight to Celery and every in-process
pool worker run every task: no cap, tenant limit or breaker refuses.
:func:`eager` / fixture ``bulkhead_eager`` set ``task_always_eager``, under
which Celery never publishes, so admission never runs at all.
"""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .admission import Admission
from .breaker import CLOSED, HALF_OPEN, OPEN
from .bulkhead import Bulkhead, installed_on
from .caps import CURRENT, HOOKED_TRANSPORTS, CappedPush, QueueFull
from .errors import CircuitOpen, ConfigurationError, PoolFull, Rejected, TenantLimited
from .results import DroppedResult
from .routing import consumed_queues, pool_queue
from .tenants import bucket_key, lease_key, tenant_id

if TYPE_CHECKING:
    from celery import Celery
    from celery.worker import WorkController

    from .breaker import Circuit
    from .pool import Pool

__all__ = [
    "FILLER_HEADER",
    "Caught",
    "PoolWorker",
    "assert_pool_full",
    "assert_tenant_limited",
    "bulkheads_disabled",
    "drain",
    "eager",
    "expect_circuit_open",
    "expect_pool_full",
    "expect_tenant_limited",
    "fill_pool",
    "is_enabled",
    "pool_worker",
    "reset_breaker",
    "reset_tenant",
    "set_enabled",
    "trip_breaker",
]

#: The header that marks a message published by :func:`fill_pool` (it is not a task).
FILLER_HEADER = "celery_bulkhead_filler"
E = TypeVar("E", bound=Rejected)


def _bulkhead(app_or_bulkhead: Celery | Bulkhead) -> Bulkhead:
    if isinstance(app_or_bulkhead, Bulkhead):
        return app_or_bulkhead
    return installed_on(app_or_bulkhead)


# -- switching bulkheads off ------------------------------------------------------


def set_enabled(enabled: bool) -> None:
    """Switch admission on or off for every app of this process, present and future.

    ``set_enabled(False)`` (for instance in a ``conftest.py``): every publish
    of a pool task goes straight to Celery (to the pool's queue, as routed),
    no cap, tenant limit or breaker refuses it, and the in-process workers of
    :func:`pool_worker` run every task.  ``set_enabled(True)`` switches back.
    Workers in other processes are not affected.
    """
    Admission.disabled = not enabled


def is_enabled(app: Celery | Bulkhead | None = None) -> bool:
    """Whether admission is on: for ``app``, or by default for every app."""
    if app is None:
        return not Admission.disabled
    return not _bulkhead(app).admission.disabled


@contextlib.contextmanager
def bulkheads_disabled(app: Celery | Bulkhead) -> Iterator[None]:
    """Within the block, ``app``'s bulkheads refuse nothing (see :func:`set_enabled`).

    Publishes still go to the pool's queue; only the gates are skipped.  The
    previous state is restored on exit, also when the block raises.
    """
    admission = _bulkhead(app).admission
    previous = vars(admission).get("disabled")
    admission.disabled = True
    try:
        yield
    finally:
        if previous is None:
            del admission.disabled  # back to the process-wide default
        else:
            admission.disabled = previous


@contextlib.contextmanager
def eager(app: Celery | Bulkhead, *, propagates: bool = True) -> Iterator[None]:
    """Within the block, ``app`` runs tasks eagerly (``task_always_eager``).

    Eager tasks run in the caller and are never published, so admission
    never runs: no cap, tenant limit or breaker is involved, and nothing
    routes them to a pool.  ``app.send_task("name")`` is the exception: it
    always publishes (Celery's rule), so it still meets admission.
    ``propagates`` sets ``task_eager_propagates`` (a task's exception is
    raised by ``delay()``).  Both settings are restored on exit.
    """
    conf = (app.app if isinstance(app, Bulkhead) else app).conf
    saved = (conf.task_always_eager, conf.task_eager_propagates)
    conf.task_always_eager = True
    conf.task_eager_propagates = propagates
    try:
        yield
    finally:
        conf.task_always_eager, conf.task_eager_propagates = saved


# -- refusals -------------------------------------------------------------------------


class Caught(Generic[E]):
    """What an ``expect_*`` block caught; ``error`` (or ``value``) once the block has ended."""

    def __init__(self) -> None:
        self._error: E | None = None

    @property
    def error(self) -> E:
        if self._error is None:
            raise AssertionError("nothing caught yet: read .error after the with block")
        return self._error

    value = error  # as pytest.raises' ExceptionInfo.value

    def __repr__(self) -> str:
        return f"<Caught {self._error!r}>"


def _check(error: Rejected, expected: dict[str, Any]) -> None:
    __tracebackhide__ = True  # pytest shows the user's line, not this helper's
    wrong = {
        name: getattr(error, name)
        for name, want in expected.items()
        if want is not None and getattr(error, name) != want
    }
    if wrong:
        wanted = ", ".join(f"{name}={expected[name]!r}" for name in wrong)
        raise AssertionError(f"expected {type(error).__name__} with {wanted}, got {error!r}")


@contextlib.contextmanager
def _expect(kind: type[E], expected: dict[str, Any], hint: str) -> Iterator[Caught[E]]:
    __tracebackhide__ = True  # pytest shows the user's line, not this helper's
    caught: Caught[E] = Caught()
    try:
        yield caught
    except kind as error:
        _check(error, expected)
        caught._error = error
        return
    raise AssertionError(f"DID NOT RAISE {kind.__name__}{hint}")


_DROP_HINT = " (a pool that drops returns a DroppedResult instead: use assert_{}())"


def expect_pool_full(
    pool: str | None = None, *, depth: int | None = None, cap: int | None = None
) -> contextlib.AbstractContextManager[Caught[PoolFull]]:
    """``with expect_pool_full(pool="payments") as caught:`` the block must raise PoolFull.

    ``pool``, ``depth`` and ``cap``, when given, must match the error's;
    ``caught.error`` is the error.  A pool with ``on_full="drop"`` does not
    raise (it returns a ``DroppedResult``): use :func:`assert_pool_full`.
    """
    return _expect(
        PoolFull, {"pool": pool, "depth": depth, "cap": cap}, _DROP_HINT.format("pool_full")
    )


def expect_tenant_limited(
    pool: str | None = None, *, tenant: str | None = None
) -> contextlib.AbstractContextManager[Caught[TenantLimited]]:
    """The block must raise TenantLimited (of ``pool`` and ``tenant``, when given)."""
    return _expect(
        TenantLimited, {"pool": pool, "tenant": tenant}, _DROP_HINT.format("tenant_limited")
    )


def expect_circuit_open(
    pool: str | None = None, *, breaker: str | None = None
) -> contextlib.AbstractContextManager[Caught[CircuitOpen]]:
    """The block must raise CircuitOpen (of ``pool`` and ``breaker``, when given)."""
    return _expect(CircuitOpen, {"pool": pool, "breaker": breaker}, "")


def _assert_refused(kind: type[E], publish: Callable[[], Any], expected: dict[str, Any]) -> E:
    __tracebackhide__ = True  # pytest shows the user's line, not this helper's
    try:
        result = publish()
    except kind as error:
        _check(error, expected)
        return error
    if isinstance(result, DroppedResult) and isinstance(result.error, kind):
        _check(result.error, expected)
        return result.error
    raise AssertionError(f"DID NOT REFUSE with {kind.__name__}: the publish returned {result!r}")


def assert_pool_full(publish: Callable[[], Any], *, pool: str | None = None) -> PoolFull:
    """Call ``publish()``; it must raise PoolFull or return a DroppedResult of one.

    Returns the error, for its ``depth``, ``cap`` and ``task_id``.
    """
    return _assert_refused(PoolFull, publish, {"pool": pool})


def assert_tenant_limited(
    publish: Callable[[], Any], *, pool: str | None = None, tenant: str | None = None
) -> TenantLimited:
    """Call ``publish()``; it must raise TenantLimited or return a DroppedResult of one."""
    return _assert_refused(TenantLimited, publish, {"pool": pool, "tenant": tenant})


# -- queues ---------------------------------------------------------------------------


def fill_pool(app_or_bulkhead: Celery | Bulkhead, pool: str, n: int | None = None) -> int:
    """Publish messages into ``pool``'s queue until it holds ``max_queue``; the number published.

    With ``n``, publish ``n`` messages at most (still never beyond the cap).
    The messages are not tasks (no ``task`` header; a :data:`FILLER_HEADER`
    header): nothing runs.  A worker that meets one logs "Received and
    deleted unknown message" and discards it, so fill a pool that no worker
    consumes, or :func:`drain` it before starting one.  The cap is checked
    as admission checks it (memory:// and Redis: in the capped push itself;
    RabbitMQ: with publisher confirms), so the pool ends exactly full.
    """
    bulkhead = _bulkhead(app_or_bulkhead)
    target = bulkhead.pool(pool)
    if n is None and target.max_queue is None:
        raise ConfigurationError(
            target.name, "max_queue", None, "a cap to fill up to, or fill_pool(..., n=count)"
        )
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ConfigurationError(target.name, "n", n, "a count >= 0, or None to fill to the cap")
    limit = n if n is not None else target.max_queue
    assert limit is not None
    if target.max_queue is not None:
        limit = min(limit, target.max_queue)
    driver = bulkhead.admission.driver  # hooks the capped push into the transport
    confirm = {"confirm_publish": True} if driver == "amqp" else {}
    queue = pool_queue(target)
    refused: tuple[type[BaseException], ...] = (QueueFull,)
    if driver == "amqp":
        from amqp.exceptions import MessageNacked  # RabbitMQ: at x-max-length

        refused += (MessageNacked,)
    published = 0
    with bulkhead.app.connection_for_write(transport_options=confirm) as connection:
        producer = connection.Producer()
        push = None
        if target.max_queue is not None and driver in HOOKED_TRANSPORTS:
            push = CappedPush(target.queue, target.max_queue)
        while published < limit:
            token = CURRENT.set(push)
            try:
                producer.publish(
                    {"celery_bulkhead": "fill_pool", "pool": target.name},
                    exchange=queue.exchange,
                    routing_key=queue.routing_key,
                    declare=[queue],
                    headers={FILLER_HEADER: True},
                    serializer="json",
                    retry=False,
                )
            except refused:
                break
            finally:
                CURRENT.reset(token)
            published += 1
    return published


def drain(app_or_bulkhead: Celery | Bulkhead, pool: str) -> int:
    """Empty every queue of ``pool`` (its own and its ``.continue`` queue); messages removed.

    Only ready messages are removed: a task a worker already holds is not.
    """
    bulkhead = _bulkhead(app_or_bulkhead)
    target = bulkhead.pool(pool)
    removed = 0
    with bulkhead.app.connection_for_write() as connection:
        for name in consumed_queues(target):
            try:
                channel: Any
                with connection.channel() as channel:
                    removed += int(channel.queue_purge(name) or 0)
            except connection.channel_errors:
                pass  # RabbitMQ: never declared, so nothing waits in it
    return removed


# -- shared state -----------------------------------------------------------------------


def _circuit(bulkhead: Bulkhead, name: str) -> Circuit:
    circuit = bulkhead.circuits.get(name)
    if circuit is not None:
        return circuit
    found = bulkhead.circuit_of(bulkhead.pool(name))
    if found is None:
        raise ConfigurationError(name, "breaker", None, "a pool with a Breaker, or a breaker name")
    return found


def trip_breaker(app_or_bulkhead: Celery | Bulkhead, name: str) -> float:
    """Open the breaker ``name`` (a breaker's or a pool's name) now; seconds until a trial.

    It stays open for its ``reset_timeout`` from now.  The failures are
    recorded through the breaker's store, as a worker's would be (in-process
    on ``memory://``, the Lua transitions on Redis), so every process of the
    fleet sees it open; this process sees it at once.
    """
    circuit = _circuit(_bulkhead(app_or_bulkhead), name)
    store = circuit.store
    before, wait = store.peek(circuit)
    state = before
    if before == OPEN and wait > 0:
        circuit._remember(OPEN, wait)
        return float(wait) / 1000
    if before == HALF_OPEN:
        token = uuid.uuid4().hex
        answer, _, _ = store.acquire(circuit, token)
        if answer != "trial":
            raise RuntimeError(f"breaker {circuit.name!r}: a trial is running; cannot trip it")
        state, wait, _ = store.failure(circuit, token)
    else:
        for _ in range(circuit.breaker.fail_max):
            state, wait, _ = store.failure(circuit, None)
            if state == OPEN:
                break
    if state != OPEN:
        raise RuntimeError(f"breaker {circuit.name!r}: did not open (state {state!r})")
    circuit._remember(OPEN, wait)
    circuit._changed(before, OPEN)
    return float(wait) / 1000


def reset_breaker(app_or_bulkhead: Celery | Bulkhead, name: str) -> None:
    """Close the breaker ``name`` and forget its failures and trials (in its store, for all)."""
    circuit = _circuit(_bulkhead(app_or_bulkhead), name)
    store = circuit.store
    before, _ = store.peek(circuit)
    from .breaker.memory import MemoryBreakerStore

    if isinstance(store, MemoryBreakerStore):
        with store._lock:
            store._records.pop(circuit.name, None)
    else:  # RedisBreakerStore: its keys, as breaker/redis.py names them
        tag = f"bulkhead:{{breaker:{circuit.name}}}"
        trials = range(1, circuit.breaker.half_open_max_calls + 1)
        store._redis.client.delete(f"{tag}:state", *(f"{tag}:trial:{slot}" for slot in trials))
    circuit._remember(CLOSED, 0.0)
    if before != CLOSED:
        circuit._changed(before, CLOSED)


def reset_tenant(app_or_bulkhead: Celery | Bulkhead, pool: str, tenant: Any) -> None:
    """Give ``tenant`` a full bucket and no in-flight leases in ``pool`` (for every process)."""
    bulkhead = _bulkhead(app_or_bulkhead)
    target = bulkhead.pool(pool)
    if bulkhead.limiter is None or target.tenant is None:
        raise ConfigurationError(target.name, "tenant", None, "a pool with a TenantLimit")
    name = tenant_id(tenant)
    keys = (bucket_key(target.name, name), lease_key(target.name, name))
    store = bulkhead.limiter.store
    from .tenants.memory import MemoryStore

    if isinstance(store, MemoryStore):
        with store._lock:
            store._tats.pop(keys[0], None)
            store._leases.pop(keys[1], None)
    else:
        store.client.delete(*keys)


# -- an in-process pool worker ---------------------------------------------------------


class PoolWorker:
    """A worker for one pool, in a thread of this process, started on ``__enter__``.

    What ``celery bulkhead worker --pool NAME`` runs, in-process: the
    worker consumes only the pool's queues (its own and, when capped, its
    ``.continue`` queue), with the pool's concurrency and prefetch multiplier
    and the bulkhead bootstep serving the pool (``acks_late``, tenant limits
    and breaker at the worker, metrics).  Built on Celery's
    ``celery.contrib.testing.worker.start_worker`` (as Celery's
    ``celery_worker`` fixture is): no mingle, gossip or heartbeat, and no
    ping check (the ping task would go to the default queue).

    The execution pool is the pool's own when it is ``threads`` or
    ``solo``, else ``threads`` (prefork does not share a ``memory://``
    broker, and forks a test process); ``worker_pool=`` chooses.  Time limits
    apply only with ``worker_pool="prefork"``.  On exit the worker stops and
    what it changed on the app (the tasks' ``acks_late`` and ``Request``,
    the selected queues) is put back.  Celery's worker state is per process:
    run one in-process worker at a time.
    """

    def __init__(
        self,
        app_or_bulkhead: Celery | Bulkhead,
        pool: str,
        *,
        worker_pool: str | None = None,
        concurrency: int | None = None,
        shutdown_timeout: float = 10.0,
        **worker_options: Any,
    ) -> None:
        self.bulkhead = _bulkhead(app_or_bulkhead)
        self.pool: Pool = self.bulkhead.pool(pool)
        own = self.pool.worker_pool
        self.worker_pool = worker_pool or (own if own in ("threads", "solo") else "threads")
        self.concurrency = 1 if self.worker_pool == "solo" else concurrency or self.pool.concurrency
        self.shutdown_timeout = shutdown_timeout
        self.options = worker_options
        self.worker: WorkController | None = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> WorkController:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def start(self) -> WorkController:
        """Start the worker and wait until it consumes; the Celery ``WorkController``."""
        global _running
        if self.worker is not None:
            return self.worker
        if _running is not None:
            raise RuntimeError(
                f"{_running!r} is running: Celery's worker state is per process, so "
                "run one in-process worker at a time"
            )
        from celery.contrib.testing.worker import start_worker

        pool, app = self.pool, self.bulkhead.app
        options: dict[str, Any] = {
            "queues": consumed_queues(pool),
            "prefetch_multiplier": pool.prefetch_multiplier,
            "hostname": f"{pool.name}@bulkhead-test-{uuid.uuid4().hex[:8]}",
            "bulkhead_pool": pool.name,
            "perform_ping_check": False,
            "shutdown_timeout": self.shutdown_timeout,
            "WorkController": _controller_class(),
        }
        if self.worker_pool == "prefork":
            options.update(time_limit=pool.time_limit, soft_time_limit=pool.soft_time_limit)
        options.update(self.options)
        with contextlib.ExitStack() as stack:
            stack.callback(self._restorer())
            self.worker = stack.enter_context(
                start_worker(app, concurrency=self.concurrency, pool=self.worker_pool, **options)
            )
            self._stack = stack.pop_all()
        _running = self
        return self.worker

    def stop(self) -> None:
        """Stop the worker (it finishes its running tasks first) and restore the app."""
        global _running
        stack, self._stack, self.worker = self._stack, None, None
        try:
            if stack is not None:
                stack.close()
        finally:
            if _running is self:
                _running = None

    def _restorer(self) -> Callable[[], None]:
        """What the worker and its bootstep change on the app, put back when it stops."""
        app, admission = self.bulkhead.app, self.bulkhead.admission
        queues: Any = app.amqp.queues
        consume_from = queues._consume_from  # set by the worker's queue selection
        in_worker = admission.in_worker
        missing = object()
        tasks = [
            (task, {key: vars(task).get(key, missing) for key in ("acks_late", "Request")})
            for task in self.bulkhead.tasks_in(self.pool)
        ]

        def restore() -> None:
            queues._consume_from = consume_from
            admission.in_worker = in_worker
            for task, saved in tasks:
                for key, value in saved.items():
                    if value is missing:
                        vars(task).pop(key, None)
                    else:
                        setattr(task, key, value)

        return restore

    def __repr__(self) -> str:
        state = "running" if self.worker is not None else "stopped"
        return f"<PoolWorker pool={self.pool.name!r} {self.worker_pool} {state}>"


#: The in-process worker running now, if any.
_running: PoolWorker | None = None


def pool_worker(app_or_bulkhead: Celery | Bulkhead, pool: str, **options: Any) -> PoolWorker:
    """``with pool_worker(app, "payments"):`` the pool's worker runs (see :class:`PoolWorker`)."""
    return PoolWorker(app_or_bulkhead, pool, **options)


#: The longest a ``memory://`` worker waits for a message before it looks at
#: its state again (Celery's loop for it waits 2 s, and polls every 1 s).
_MEMORY_POLL = 0.05


@functools.cache
def _controller_class() -> type[Any]:
    from celery.contrib.testing.worker import TestWorkController

    class BulkheadTestWorkController(TestWorkController):
        """Celery's test worker, made ready for the bulkhead switches before it consumes."""

        __test__ = False

        def on_consumer_ready(self, consumer: Any) -> None:
            # Called in the worker's thread before its loop starts.
            connection = consumer.connection
            if connection.transport.driver_type == "memory":
                # Stops in ~0.1 s instead of 4 s, and picks a task up within 50 ms.
                drain_events = connection.drain_events
                connection.drain_events = functools.partial(_short_drain, drain_events)
            _switchable_gates(self)
            super().on_consumer_ready(consumer)

    return BulkheadTestWorkController


def _short_drain(drain_events: Callable[..., Any], timeout: float | None = None, **kw: Any) -> Any:
    return drain_events(timeout=min(timeout or _MEMORY_POLL, _MEMORY_POLL), **kw)


def _switchable_gates(worker: Any) -> None:
    """Make the node's worker gate (tenant limits, breaker) obey the bulkhead switches."""
    for step in worker.blueprint.order:
        gate = getattr(step, "gate", None) if getattr(step, "label", "") == "bulkhead" else None
        if gate is None or "admit" in vars(gate):  # none, or wrapped at an earlier start
            continue
        admission = installed_on(worker.app).admission
        admit, finished = gate.admit, gate.finished

        def gated_admit(request: Any, admit: Any = admit, admission: Any = admission) -> bool:
            if admission.disabled:
                request.bulkhead_bypassed = True  # ran without a lease or trial: report nothing
                return True
            result: bool = admit(request)
            return result

        def gated_finished(request: Any, *args: Any, finished: Any = finished) -> None:
            if not getattr(request, "bulkhead_bypassed", False):
                finished(request, *args)

        gate.admit, gate.finished = gated_admit, gated_finished


# -- pytest fixtures (the helpers above work without pytest) ----------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - a unittest suite without pytest
    pass
else:

    @pytest.fixture
    def bulkhead_worker() -> Iterator[Callable[..., PoolWorker]]:
        """Factory: ``with bulkhead_worker(app, "payments") as worker:`` runs the pool's worker.

        Takes :func:`pool_worker`'s arguments.  A worker still running when
        the test ends is stopped then.
        """
        made: list[PoolWorker] = []

        def make(app_or_bulkhead: Celery | Bulkhead, pool: str, **options: Any) -> PoolWorker:
            worker = PoolWorker(app_or_bulkhead, pool, **options)
            made.append(worker)
            return worker

        yield make
        for worker in reversed(made):
            worker.stop()

    @pytest.fixture(name="bulkheads_disabled")
    def _bulkheads_disabled_fixture() -> Iterator[None]:
        """For this test, every app's bulkheads refuse nothing (``set_enabled(False)``)."""
        previous = Admission.disabled
        Admission.disabled = True
        try:
            yield
        finally:
            Admission.disabled = previous

    @pytest.fixture
    def bulkhead_eager() -> Iterator[Callable[..., Any]]:
        """Factory: ``bulkhead_eager(app)`` runs ``app``'s tasks eagerly until the test ends.

        Takes :func:`eager`'s ``propagates``; returns the app.
        """
        with contextlib.ExitStack() as stack:

            def make(app: Any, *, propagates: bool = True) -> Any:
                stack.enter_context(eager(app, propagates=propagates))
                return app

            yield make
