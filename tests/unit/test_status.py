"""What ``bulkhead status`` counts, from the workers' replies; and what it says without a broker."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_bulkhead import Pool, cli
from celery_bulkhead.status import PoolStatus, report, tally, unknown

PAY = Pool("pay", queue="x.pay", concurrency=2)
PAYMENTS = Pool("payments", queue="x.payments", concurrency=4)
CAPPED = Pool("capped", queue="x.capped", max_queue=10)


def running(*routing_keys: str | None) -> list[dict[str, Any]]:
    """An ``inspect active`` reply for one node: one request per routing key."""
    return [
        {"id": f"t{i}", "delivery_info": {"exchange": "", "routing_key": key}}
        for i, key in enumerate(routing_keys)
    ]


def consuming(*queues: str) -> list[dict[str, Any]]:
    """An ``inspect active_queues`` reply for one node."""
    return [{"name": name, "routing_key": name} for name in queues]


def test_in_flight_matches_the_pools_queue_exactly_not_by_prefix() -> None:
    """Queue ``x.pay`` does not count the tasks of queue ``x.payments`` on a node serving both."""
    pay, payments = tally(
        [PAY, PAYMENTS],
        {"x.pay": 0, "x.payments": 3},
        {"both@h": consuming("x.pay", "x.payments")},
        {"both@h": running("x.payments", "x.payments", "x.pay")},
    )
    assert pay == PoolStatus("pay", "x.pay", 0, None, ("both@h",), 1, 2)
    assert payments == PoolStatus("payments", "x.payments", 3, None, ("both@h",), 2, 4)


def test_a_capped_pool_counts_its_continuation_queue() -> None:
    (capped,) = tally(
        [CAPPED],
        {"x.capped": 1},
        {"capped@h": consuming("x.capped", "x.capped.continue")},
        {"capped@h": running("x.capped", "x.capped.continue", "x.capped.continued", "x")},
    )
    assert capped.inflight == 2
    assert capped.cap == 10


def test_only_the_pools_consumers_are_counted_and_odd_requests_are_skipped() -> None:
    """Tasks on a node that does not consume the pool's queue are not the pool's."""
    (pay,) = tally(
        [PAY],
        {"x.pay": 0},
        {"pay@h": consuming("x.pay"), "other@h": consuming("x.other"), "silent@h": None},
        {
            "pay@h": [*running("x.pay", None), {"id": "no-delivery-info"}],
            "other@h": running("x.pay"),  # not a consumer of x.pay: not counted
        },
    )
    assert pay.consumers == ("pay@h",)
    assert pay.inflight == 1


def test_a_pool_without_consumers_has_none_in_flight() -> None:
    (pay,) = tally([PAY], {"x.pay": 5}, {"other@h": consuming("x.other")}, {})
    assert (pay.depth, pay.consumers, pay.inflight) == (5, (), 0)


def test_replies_not_received_are_unknown_not_zero() -> None:
    (no_replies,) = tally([PAY], {}, None, None)
    assert (no_replies.depth, no_replies.consumers, no_replies.inflight) == (None, None, None)
    (no_active,) = tally([PAY], {"x.pay": 0}, {"pay@h": consuming("x.pay")}, None)
    assert (no_active.consumers, no_active.inflight) == (("pay@h",), None)


def test_an_unknown_report_keeps_the_configuration() -> None:
    result = unknown([PAY, CAPPED], "broker unreachable")
    assert result.broker_error == "broker unreachable"
    assert [s.as_dict() for s in result.pools] == [
        {
            "pool": "pay",
            "queue": "x.pay",
            "depth": None,
            "cap": None,
            "consumers": None,
            "inflight": None,
            "concurrency": 2,
        },
        {
            "pool": "capped",
            "queue": "x.capped",
            "depth": None,
            "cap": 10,
            "consumers": None,
            "inflight": None,
            "concurrency": 1,
        },
    ]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but never listening: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    "url",
    ["redis://:s3cret-pw@127.0.0.1:{port}/9", "amqp://guest:s3cret-pw@127.0.0.1:{port}//"],
    ids=["redis", "rabbitmq"],
)
def test_an_unreachable_broker_gives_unknown_rows_at_once(url: str, closed_port: int) -> None:
    app = Celery("status", broker=url.format(port=closed_port), set_as_current=False)
    started = time.monotonic()
    result = report(app, [PAY, CAPPED], timeout=1.0)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0 + 1.0, f"took {elapsed:.2f}s"
    assert result.pools == unknown([PAY, CAPPED], "").pools
    assert result.broker_error is not None
    assert result.broker_error.startswith("broker unreachable at ")
    assert f"127.0.0.1:{closed_port}" in result.broker_error
    assert "s3cret-pw" not in result.broker_error
    app.close()


def test_the_command_answers_unknown_when_the_report_hangs_past_its_worst_case(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broker lost between the probe and the inspect publish cannot hang ``status``."""
    release = threading.Event()
    monkeypatch.setattr(cli, "report", lambda app, pools, timeout: release.wait(30))
    monkeypatch.setattr(cli, "_DEADLINE_SLACK", 0.2)
    started = time.monotonic()
    try:
        result = cli._report_within(None, [PAY], timeout=0.1)
    finally:
        release.set()
    assert time.monotonic() - started < 2.0
    assert result == unknown([PAY], "broker did not answer within 0.5s")


def test_the_command_reraises_what_the_report_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(app: Any, pools: Any, timeout: float) -> None:
        raise RuntimeError("a bug, not an outage")

    monkeypatch.setattr(cli, "report", broken)
    with pytest.raises(RuntimeError, match="a bug, not an outage"):
        cli._report_within(None, [PAY], timeout=0.1)
