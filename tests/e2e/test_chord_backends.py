"""A chord's body is never refused, on every result backend Celery ships that runs here.

With Redis (native chords) a header task's worker publishes the body when the
last part returns.  The others (database, file) use ``celery.chord_unlock``:
the producer publishes it at submit time, to the *body's* queue, and it
publishes the body once the header is done.  Both must pass a full pool.

Each test fills the body's pool (cap 2) before the chord is submitted; the
worker consumes the header's pool and the body pool's continuation queue but
not the body pool's own queue (its workers are busy), so the pool stays full
and the body meets it.  ``rpc://`` has no chords at all: Celery refuses them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery, chord

from celery_bulkhead import PoolFull
from tests.app.chords import CAP, RECORDS_URL, make_chords_app
from tests.e2e.conftest import Env, _environment

#: backend -> (broker, result backend URL for a test's tmp dir)
BACKENDS: dict[str, tuple[str, Callable[[Path], str]]] = {
    "redis": ("redis", lambda tmp: RECORDS_URL),
    "sqlite": ("rabbitmq", lambda tmp: f"db+sqlite:///{tmp}/results.db"),
    "file": ("redis", lambda tmp: f"file://{tmp}/results"),
    "rpc": ("rabbitmq", lambda tmp: "rpc://"),
}
WITH_CHORDS = ["redis", "sqlite", "file"]


@pytest.fixture
def chords(
    request: pytest.FixtureRequest,
    session_prefix: str,
    records_client: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Env]:
    """The chords app (tests/app/chords.py) with the backend named by the test's parameter."""
    broker, url_for = BACKENDS[request.param]
    backend = url_for(tmp_path)
    (tmp_path / "results").mkdir()
    monkeypatch.setenv("BULKHEAD_TEST_RESULT_BACKEND", backend)  # for the workers

    def make(broker_url: str, prefix: str) -> Celery:
        return make_chords_app(broker_url, prefix, backend)

    yield from _environment(
        request, broker, session_prefix, records_client, tmp_path, make, "tests.app.chords"
    )


def _start_worker(env: Env, pool: str) -> None:
    """One node for the header's pool and the body pool's follow-ups, not its own queue."""
    queues = f"{env.prefix}.head,{env.prefix}.{pool}.continue"
    env.start(
        "--queues",
        queues,
        "--pool",
        "threads",
        "--concurrency",
        "4",
        bulkhead=False,
    )


def _fill(env: Env, pool: str) -> None:
    """Fill ``pool`` to its cap, and prove that new work is refused."""
    fill = env.app.tasks[f"chords.{pool}.fill"]
    for i in range(CAP):
        fill.delay(i)
    if pool == "rejecting":
        with pytest.raises(PoolFull):
            fill.delay(CAP)
    else:
        assert fill.delay(CAP).dropped
    assert env.ready_messages(f"{env.prefix}.{pool}") == CAP


@pytest.mark.parametrize("pool", ["rejecting", "dropping"])
@pytest.mark.parametrize("chords", WITH_CHORDS, indirect=True)
def test_a_chords_body_in_a_full_pool_runs_once(chords: Env, pool: str) -> None:
    """Submitting is never refused for the body; the body runs once, from ``.continue``."""
    _start_worker(chords, pool)
    _fill(chords, pool)
    part, body = chords.app.tasks["chords.part"], chords.app.tasks[f"chords.{pool}.body"]
    # The slow part keeps chord_unlock (first poll after 1 s) retrying a few times.
    result = chord([part.s(1), part.s(2, 1.5)], body.s("body")).apply_async()
    assert not getattr(result, "dropped", False)
    assert result.get(timeout=20) == 3
    time.sleep(0.5)  # a second copy of the body would show by now
    (done,) = chords.records.find("done", "body")
    assert done["routing_key"] == f"{chords.prefix}.{pool}.continue"
    assert done["id"] == result.id
    assert chords.ready_messages(f"{chords.prefix}.{pool}") == CAP  # the cap still holds


@pytest.mark.parametrize("pool", ["rejecting", "dropping"])
@pytest.mark.parametrize("chords", WITH_CHORDS, indirect=True)
def test_header_members_in_a_full_pool_are_still_refused(chords: Env, pool: str) -> None:
    """A header member is new work: refused by its own pool's cap (``drop`` acts as reject)."""
    _fill(chords, pool)
    fill, body = chords.app.tasks[f"chords.{pool}.fill"], chords.app.tasks["chords.part"]
    with pytest.raises(PoolFull) as info:
        chord([fill.s(10), fill.s(11)], body.s()).apply_async()
    assert info.value.pool == pool
    assert chords.ready_messages(f"{chords.prefix}.{pool}") == CAP


@pytest.mark.parametrize("chords", ["rpc"], indirect=True)
def test_rpc_refuses_chords_itself_before_any_publish(chords: Env) -> None:
    """Celery's ``rpc://`` backend has no chords: its own error, not a cap's, and nothing sent."""
    _fill(chords, "rejecting")
    part, body = chords.app.tasks["chords.part"], chords.app.tasks["chords.rejecting.body"]
    with pytest.raises(NotImplementedError, match="does not support chords"):
        chord([part.s(1)], body.s("body")).apply_async()
    assert chords.ready_messages(f"{chords.prefix}.rejecting") == CAP
    assert chords.ready_messages(f"{chords.prefix}.rejecting.continue") == 0
    assert chords.ready_messages(f"{chords.prefix}.head") == 0
