"""Assigning tasks to pools and routing them, without dropping the app's own routing."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery, shared_task
from kombu import Queue

from celery_bulkhead import Bulkhead, ConfigurationError, Pool
from tests.e2e.conftest import Env, wait_for


def new_app(**conf: Any) -> Celery:
    app = Celery("routing", broker="memory://", set_as_current=False)
    app.conf.update(conf)
    return app


def queue_of(app: Celery, name: str, **options: Any) -> str:
    task = app.tasks.get(name)
    return str(app.amqp.router.route(dict(options), name, task_type=task)["queue"].name)


def test_decorator_bulkhead_task_and_pattern_route_to_their_pools() -> None:
    app = new_app()
    bulkhead = Bulkhead(app, pools=[Pool("io"), Pool("reports", tasks=["reports.*"])])

    @app.task(bulkhead="io", name="shop.fetch", shared=False)
    def fetch() -> None: ...

    @bulkhead.task(pool="io", name="shop.push", shared=False)
    def push() -> None: ...

    @app.task(name="reports.daily", shared=False)
    def daily() -> None: ...

    @app.task(name="shop.other", shared=False)
    def other() -> None: ...

    assert queue_of(app, "shop.fetch") == "bulkhead.io"
    assert queue_of(app, "shop.push") == "bulkhead.io"
    assert queue_of(app, "reports.daily") == "bulkhead.reports"
    assert queue_of(app, "reports.never.registered") == "bulkhead.reports"  # send_task by name
    assert queue_of(app, "shop.other") == "celery"  # in no pool: Celery's default
    assert bulkhead.pool_for("shop.fetch") is bulkhead.pool("io")
    assert bulkhead.pool_for("shop.other") is None


def test_send_task_routes_a_decorated_task_before_the_app_is_finalized() -> None:
    app = new_app()
    Bulkhead(app, pools=[Pool("io")])

    @app.task(bulkhead="io", name="shop.fetch", shared=False)
    def fetch() -> None: ...

    assert not app.finalized
    assert app.amqp.router.route({}, "shop.fetch")["queue"].name == "bulkhead.io"
    assert not app.finalized


def test_task_name_generated_by_celery_is_routed() -> None:
    app = new_app()
    Bulkhead(app, pools=[Pool("io")])

    # shared=False: a shared task would be added to every app made later in this
    # process, whose Bulkheads have no pool "io".
    @app.task(bulkhead="io", shared=False)
    def fetch() -> None: ...

    assert queue_of(app, fetch.name) == "bulkhead.io"


def test_decorator_wins_over_another_pools_pattern() -> None:
    app = new_app()
    Bulkhead(app, pools=[Pool("io"), Pool("reports", tasks=["reports.*"])])

    @app.task(bulkhead="io", name="reports.live", shared=False)
    def live() -> None: ...

    assert queue_of(app, "reports.live") == "bulkhead.io"


def test_explicit_queue_option_still_wins_as_in_celery() -> None:
    app = new_app()
    Bulkhead(app, pools=[Pool("io", tasks=["shop.*"])])
    assert queue_of(app, "shop.fetch", queue="celery") == "celery"


def test_unknown_pool_is_an_error_at_decoration_time() -> None:
    app = new_app()
    bulkhead = Bulkhead(app, pools=[Pool("io"), Pool("cpu")])
    with pytest.raises(ConfigurationError) as info:

        @app.task(bulkhead="oi", shared=False)
        def fetch() -> None: ...

    assert str(info.value) == (
        "task 'tests.e2e.test_routing.fetch' (module tests.e2e.test_routing): "
        "invalid bulkhead='oi'; allowed: one of 'io', 'cpu' (unknown pool)"
    )
    with pytest.raises(ConfigurationError, match="invalid pool='oi'"):
        bulkhead.task(pool="oi")


def test_unknown_pool_on_a_shared_task_is_caught_by_validate_tasks() -> None:
    from celery import _state

    before = set(_state._on_app_finalizers)
    try:

        @shared_task(bulkhead="nowhere", name="tests.shared_unknown_pool")
        def orphan() -> None: ...

        app = new_app()
        bulkhead = Bulkhead(app, pools=[Pool("io")])
        with pytest.raises(ConfigurationError, match="invalid bulkhead='nowhere'"):
            bulkhead.validate_tasks()
    finally:
        # A shared task joins every app made later in the process: take it back,
        # so later tests' apps (with other pools) do not inherit it.
        _state._on_app_finalizers.difference_update(set(_state._on_app_finalizers) - before)


def test_a_shared_task_of_one_apps_pool_is_in_no_pool_of_another_app() -> None:
    """``@app.task(bulkhead=...)`` with Celery's default ``shared=True``: Celery adds
    the task to every app of the process as it is finalized.  Another app's
    Bulkhead, which has no such pool, treats it as a task in none of its pools
    instead of refusing to start."""
    from celery import _state

    before = set(_state._on_app_finalizers)
    try:
        first = new_app()
        Bulkhead(first, pools=[Pool("io", queue="shared.io")])

        @first.task(bulkhead="io", name="tests.shared_into_others")
        def fetch() -> None: ...

        second = new_app()
        other = Bulkhead(second, pools=[Pool("reports", queue="shared.reports")])
        other.validate_tasks()  # finalizes second: the shared task joins it, no error
        assert "tests.shared_into_others" in second.tasks
        assert other.pool_for("tests.shared_into_others") is None
        assert queue_of(second, "tests.shared_into_others") == "celery"
        assert queue_of(first, "tests.shared_into_others") == "shared.io"
        # A typo on the app itself is still refused, at decoration.
        with pytest.raises(ConfigurationError, match="did you mean 'reports'"):

            @second.task(bulkhead="report", name="tests.typo", shared=False)
            def typo() -> None: ...

    finally:
        _state._on_app_finalizers.difference_update(set(_state._on_app_finalizers) - before)


def test_the_apps_own_routes_keep_working() -> None:
    def by_function(name: str, *args: Any, **kwargs: Any) -> dict[str, str] | None:
        return {"queue": "from-function"} if name == "legacy.func" else None

    app = new_app(task_routes=[{"legacy.*": {"queue": "legacy"}}, by_function])
    Bulkhead(app, pools=[Pool("io", tasks=["shop.*"])])
    assert queue_of(app, "legacy.cleanup") == "legacy"
    assert queue_of(app, "legacy.func") == "legacy"  # the dict comes first, as before
    assert queue_of(app, "shop.fetch") == "bulkhead.io"

    app = new_app(task_routes={"legacy.*": "legacy"})
    Bulkhead(app, pools=[Pool("io", tasks=["shop.*"])])
    assert queue_of(app, "legacy.cleanup") == "legacy"
    assert queue_of(app, "shop.fetch") == "bulkhead.io"


@pytest.mark.parametrize("form", ["list", "dict"])
def test_the_apps_own_queues_stay_declared(form: str) -> None:
    own = [Queue("emails"), Queue("celery")]
    queues: Any = own if form == "list" else {q.name: q for q in own}
    app = new_app(task_queues=queues)
    Bulkhead(app, pools=[Pool("io")])
    assert set(app.amqp.queues) == {"emails", "celery", "bulkhead.io"}


def test_without_task_queues_the_default_queue_stays_declared() -> None:
    app = new_app(task_default_queue="main")
    Bulkhead(app, pools=[Pool("io")])
    assert set(app.amqp.queues) == {"main", "bulkhead.io"}


def test_reconfiguring_the_app_keeps_the_pools_routing() -> None:
    app = new_app()
    Bulkhead(app, pools=[Pool("io", tasks=["shop.*"])])
    app.config_from_object(SimpleNamespace(task_routes={"legacy.*": "legacy"}), force=True)
    assert queue_of(app, "shop.fetch") == "bulkhead.io"
    assert queue_of(app, "legacy.x") == "legacy"
    routers = [r for r in app.conf.task_routes if type(r).__name__ == "BulkheadRouter"]
    assert len(routers) == 1


def test_pools_from_settings_including_djangos_namespace() -> None:
    app = new_app(bulkhead_pools={"io": {"concurrency": 3, "tasks": ["shop.*"]}})
    bulkhead = Bulkhead(app)
    assert bulkhead.pool("io").concurrency == 3

    django_settings = SimpleNamespace(
        CELERY_BROKER_URL="memory://", CELERY_BULKHEAD_POOLS={"io": {"concurrency": 5}}
    )
    app = Celery("django_like", set_as_current=False)
    app.config_from_object(django_settings, namespace="CELERY")
    assert Bulkhead(app).pool("io").concurrency == 5


@pytest.mark.parametrize(
    ("pools", "match"),
    [
        ([Pool("a"), Pool("a", concurrency=2)], "pool 'a': invalid name='a'"),
        (
            [Pool("a", queue="q"), Pool("b", queue="q")],
            "pool 'b': invalid queue='q'.*pool 'a' uses it",
        ),
        (
            [Pool("a", tasks=["reports.*"]), Pool("b", tasks=["reports.*"])],
            "pool 'b': invalid tasks=",
        ),
        (
            [Pool("a", tasks=["reports.*"]), Pool("b", tasks=["reports.daily"])],
            "pool 'a' already claims 'reports.\\*'",
        ),
        ([Pool("a", queue="celery")], "task_default_queue"),
        ([], "at least one pool"),
    ],
    ids=[
        "duplicate-name",
        "duplicate-queue",
        "same-pattern",
        "covering-pattern",
        "default-queue",
        "no-pools",
    ],
)
def test_conflicting_pools_are_refused(pools: list[Pool], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Bulkhead(new_app(), pools=pools)


def test_a_queue_the_app_already_declares_is_refused() -> None:
    app = new_app(task_queues=[Queue("bulkhead.io")])
    with pytest.raises(ConfigurationError, match="already declared in the app's task_queues"):
        Bulkhead(app, pools=[Pool("io")])


def test_a_name_matched_by_two_pools_patterns_is_refused_when_routed() -> None:
    app = new_app()
    Bulkhead(app, pools=[Pool("a", tasks=["shop.*.sync"]), Pool("b", tasks=["shop.api.*"])])
    with pytest.raises(ConfigurationError, match="matched by pools 'a', 'b'"):
        app.amqp.router.route({}, "shop.api.sync")


def test_missing_pools_and_a_second_bulkhead_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="no pools declared"):
        Bulkhead(new_app())
    app = new_app()
    Bulkhead(app, pools=[Pool("io")])
    with pytest.raises(ConfigurationError, match="one Bulkhead per app"):
        Bulkhead(app, pools=[Pool("cpu")])


def test_send_task_by_name_lands_in_the_pools_queue_on_the_broker(env: Env) -> None:
    """On a fresh producer (app not finalized), send_task puts the message in the pool's queue."""
    assert not env.app.finalized
    env.app.send_task("shop.echo", args=["queued"])
    env.app.send_task("shop.reports.daily", args=["queued"])
    for pool in ("fast", "slow"):
        queue = f"{env.prefix}.{pool}"
        wait_for(lambda q=queue: env.ready_messages(q) == 1, 10, f"a message in {queue}")
    assert env.ready_messages(f"{env.prefix}.default") == 0
