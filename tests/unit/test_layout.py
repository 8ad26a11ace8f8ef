"""House rules a test can hold: producers never load the worker side, drivers are optional."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.support import ROOT

_BLOCKED_PRODUCER = textwrap.dedent(
    """
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "celery_bulkhead.worker" or name.startswith("celery_bulkhead.worker."):
                raise ImportError("blocked: " + name)
            if name.split(".")[0] in ("redis", "prometheus_client.exposition_worker"):
                raise ImportError("blocked: " + name)
            return None

    sys.meta_path.insert(0, Block())
    from celery import Celery
    from celery_bulkhead import Bulkhead, Pool, PoolFull, TenantLimit, Breaker

    app = Celery("layout", broker="memory://", set_as_current=False)
    app.conf.task_default_queue = "layout.default"
    Bulkhead(app, pools=[
        Pool("p", max_queue=2, tenant=TenantLimit(key="t", rate="100/s"), breaker=Breaker()),
    ])

    @app.task(bulkhead="p", shared=False, name="layout.noop")
    def noop(t): ...

    noop.delay(t="a")
    noop.delay(t="a")
    try:
        noop.delay(t="a")
    except PoolFull:
        pass
    else:
        raise SystemExit("the cap did not hold")
    loaded = sorted(m for m in sys.modules if m.startswith("celery_bulkhead"))
    assert not any(m.startswith("celery_bulkhead.worker") for m in loaded), loaded
    assert "redis" not in sys.modules
    print("ok", len(loaded))
    """
)


def test_a_producer_publishes_without_the_worker_side_or_redis_py() -> None:
    """Publishing (caps, tenants, breaker on memory://) never imports ``celery_bulkhead.worker``."""
    result = subprocess.run(
        [sys.executable, "-c", _BLOCKED_PRODUCER],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok")


def test_the_worker_bootstep_is_registered_by_name() -> None:
    """The Bulkhead adds its bootstep as a dotted path, so registering it imports nothing."""
    from celery import Celery

    from celery_bulkhead import Bulkhead, Pool

    app = Celery("layout-step", broker="memory://", set_as_current=False)
    Bulkhead(app, pools=[Pool("p")])
    assert "celery_bulkhead.worker.step:PoolWorkerStep" in app.steps["worker"]
