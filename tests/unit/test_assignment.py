"""An unknown pool name is refused with a message that says which task to fix, and where."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery, Task

from celery_bulkhead import Bulkhead, ConfigurationError, Pool

MODULE = __name__  # tests.unit.test_assignment: where the tasks below are defined


def new_bulkhead() -> Bulkhead:
    app = Celery("shop", broker="memory://", set_as_current=False)
    return Bulkhead(app, pools=[Pool("payments"), Pool("reports")])


def test_a_decorated_task_with_a_misspelt_pool_names_itself_and_the_closest_pool() -> None:
    app = new_bulkhead().app

    def charge(order_id: int) -> None: ...

    with pytest.raises(ConfigurationError) as info:
        app.task(bulkhead="paymnets", shared=False)(charge)
    assert str(info.value) == (
        f"task '{MODULE}.charge' (module {MODULE}): invalid bulkhead='paymnets'; "
        "allowed: one of 'payments', 'reports' (unknown pool; did you mean 'payments'?)"
    )
    error = info.value
    assert (error.pool, error.setting, error.value) == (None, "bulkhead", "paymnets")
    assert error.allowed == "one of 'payments', 'reports'"
    assert error.detail == "unknown pool; did you mean 'payments'?"
    assert f"{MODULE}.charge" not in app.tasks  # refused before Celery registered it


def test_the_task_is_named_as_celery_names_it_in_every_decorator_form() -> None:
    app = new_bulkhead().app

    def refund() -> None: ...

    with pytest.raises(ConfigurationError, match=r"^task 'billing\.refund' \(module "):
        app.task(refund, bulkhead="refnds", name="billing.refund", shared=False)
    with pytest.raises(ConfigurationError, match=r"^task 'billing\.refund' \(module "):
        app.task(bulkhead="refnds", name="billing.refund", shared=False)(refund)


def test_a_pool_name_nothing_resembles_gets_no_suggestion() -> None:
    app = new_bulkhead().app

    def charge() -> None: ...

    with pytest.raises(ConfigurationError) as info:
        app.task(bulkhead="zzz", shared=False)(charge)
    assert str(info.value).endswith(
        "invalid bulkhead='zzz'; allowed: one of 'payments', 'reports' (unknown pool)"
    )


def test_a_pool_name_of_the_wrong_type_is_refused_without_a_suggestion() -> None:
    app = new_bulkhead().app

    def charge() -> None: ...

    with pytest.raises(ConfigurationError, match=r"invalid bulkhead=\['payments'\]; .*pool\)$"):
        app.task(bulkhead=["payments"], shared=False)(charge)


class Refund(Task):
    """A class-based task whose ``bulkhead`` attribute names no declared pool."""

    name = "billing.refund"
    bulkhead = "report"

    def run(self, *args: Any, **kwargs: Any) -> None: ...


def test_a_task_class_attribute_is_checked_by_validate_tasks_naming_the_task() -> None:
    bulkhead = new_bulkhead()
    bulkhead.app.register_task(Refund())
    expected = (
        f"task 'billing.refund' (module {MODULE}): invalid bulkhead='report'; "
        "allowed: one of 'payments', 'reports' (unknown pool; did you mean 'reports'?)"
    )
    with pytest.raises(ConfigurationError) as info:
        bulkhead.validate_tasks()
    assert str(info.value) == expected
    with pytest.raises(ConfigurationError) as info:
        bulkhead.pool_for("billing.refund")
    assert str(info.value) == expected
    with pytest.raises(ConfigurationError) as info:
        list(bulkhead.tasks_in("reports"))
    assert str(info.value) == expected


def test_a_task_registered_before_the_bulkhead_is_checked_when_it_is_declared() -> None:
    app = Celery("shop", broker="memory://", set_as_current=False)
    app.register_task(Refund())
    with pytest.raises(ConfigurationError, match=r"^task 'billing\.refund' \(module "):
        Bulkhead(app, pools=[Pool("payments"), Pool("reports")])


def test_looking_up_a_pool_by_name_is_not_about_a_task() -> None:
    """``--pool`` on the command line and ``Bulkhead.pool()``: no task to name."""
    bulkhead = new_bulkhead()
    with pytest.raises(ConfigurationError) as info:
        bulkhead.pool("nope")
    assert (
        str(info.value)
        == "invalid pool='nope'; allowed: one of 'payments', 'reports' (unknown pool)"
    )
    with pytest.raises(ConfigurationError) as info:
        bulkhead.pool("report")
    assert str(info.value).endswith("(unknown pool; did you mean 'reports'?)")
