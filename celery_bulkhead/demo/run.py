"""The two runs of the story: start the workers, send the workload, watch, drain, stop.

What is measured, and how, is in :mod:`~celery_bulkhead.demo.measure`; the
producer in :mod:`~celery_bulkhead.demo.producer`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .broker import Broker, DemoError, package_path
from .downstream import Downstream
from .measure import (
    LABELS,
    RunResult,
    queue_keys,
    record_of,
    sample_depths,
    scrape_metrics,
)
from .processes import Child, Processes
from .producer import produce
from .progress import PoolCounts, Progress, Snapshot
from .story import (
    PLAIN_CONCURRENCY,
    POOLS,
    TASKS,
    DemoConfig,
    Mode,
    make_app,
    pools,
    workload,
)

__all__ = ["Session", "run_both"]

APP = "celery_bulkhead.demo.app"
WORKER_FLAGS = ("--without-gossip", "--without-mingle", "--without-heartbeat")
READY_TIMEOUT = 90.0


@dataclass
class Session:
    """What both runs share: the broker, the processes, the downstream, the output."""

    broker: Broker
    processes: Processes
    downstream: Downstream
    temp: Path
    token: str
    progress: Progress
    drain_limit: float


# -- workers ---------------------------------------------------------------------------


def _free_ports(count: int) -> int:
    """A first port with ``count`` consecutive free ones on 127.0.0.1 (racy, like any pick)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise DemoError(f"found no {count} consecutive free ports on 127.0.0.1 for the metrics")


def _worker_argv(config: DemoConfig) -> list[str]:
    celery = [sys.executable, "-m", "celery", "-A", APP]
    log = ["--loglevel", "WARNING"]
    if config.mode == "plain":
        return [
            *celery,
            "worker",
            *("--pool", "threads", "--concurrency", str(PLAIN_CONCURRENCY)),
            *("--queues", config.plain_queue, "--hostname", f"{config.prefix}@%h"),
            *WORKER_FLAGS,
            *log,
        ]
    return [*celery, "bulkhead", "worker", "--", *WORKER_FLAGS, *log]


def _worker_env(config: DemoConfig, broker: Broker) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_BROKER_")}
    env.update(config.to_environ())
    env["CELERY_BROKER_URL"] = broker.url
    env["PYTHONPATH"] = package_path()
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- one run ---------------------------------------------------------------------------


class _Run:
    """One run (plain or bulkhead): its config, its worker, its threads, what it measured."""

    def __init__(self, session: Session, mode: Mode, duration: float) -> None:
        import redis

        self.session = session
        self.mode = mode
        self.metrics_port = _free_ports(len(POOLS)) if mode == "bulkhead" else None
        self.config = DemoConfig(
            mode=mode,
            broker_url=session.broker.url,
            prefix=f"bulkhead-demo-{session.token}-{mode}",
            downstream=session.downstream.url,
            tenant_suffix=f".{session.token}",
            metrics_port=self.metrics_port,
        )
        self.result = RunResult(mode, duration)
        if mode == "bulkhead":
            self.result.caps = {pool.name: pool.max_queue for pool in pools(self.config)}
        else:
            self.result.caps = {"shared": None}
        self.client = redis.Redis.from_url(session.broker.url, socket_timeout=10)
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.worker: Child | None = None
        self._offsets = {"records": 0, "breaker": 0}
        self.warm: set[str] = set()

    # -- reading what the workers wrote ------------------------------------------------

    def _read(self) -> None:
        config, result = self.config, self.result
        raw = self.client.lrange(config.records_key, self._offsets["records"], -1)
        self._offsets["records"] += len(raw)
        for item in raw:
            entry = json.loads(item)
            if entry["seq"] < 0:
                self.warm.add(entry["pool"])
                continue
            key = (entry["pool"], entry["seq"])
            if key not in result.records:  # a redelivered task reports twice: keep the first
                result.records[key] = record_of(entry, config.tenant_suffix)
        raw = self.client.lrange(config.breaker_key, self._offsets["breaker"], -1)
        self._offsets["breaker"] += len(raw)
        for item in raw:
            entry = json.loads(item)
            result.breaker.append((entry["at"] - result.start, entry["new"]))

    def _snapshot(self, elapsed: float, draining: bool) -> Snapshot:
        result = self.result
        counts = {pool: PoolCounts() for pool in POOLS}
        for sent in list(result.sent):
            if sent.outcome == "sent":
                counts[sent.pool].sent += 1
            else:
                counts[sent.pool].refused += 1
        for record in list(result.records.values()):
            counts[record.pool].done += 1
            counts[record.pool].failed += record.failed
        breaker = result.breaker[-1][1] if result.breaker else None
        if self.mode == "bulkhead":
            breaker = breaker or "closed"
        extra = {"webhooks": f"breaker {breaker}"} if breaker else {}
        return Snapshot(
            elapsed,
            result.duration,
            self.session.downstream.phase(),
            counts,
            breaker=breaker,
            draining=draining,
            extra=extra,
        )

    def _check_worker(self, what: str) -> None:
        worker = self.worker
        if worker is not None and not worker.running():
            raise DemoError(
                f"the {self.mode} worker exited (code {worker.process.returncode}) while "
                f"{what}:\n{worker.log_tail()}"
            )

    # -- the steps ---------------------------------------------------------------------

    def start_workers(self) -> None:
        session, config = self.session, self.config
        self.worker = session.processes.spawn(
            f"{self.mode} worker",
            _worker_argv(config),
            env=_worker_env(config, session.broker),
            log_path=session.temp / f"{self.mode}-worker.log",
            layer=1,
        )

    def send_warm_up(self, app: Any) -> None:
        """One task per pool: the run is ready when each has run (publishing declares queues)."""
        now = time.time()
        app.tasks[TASKS["payments"]].apply_async((-1, now))
        app.tasks[TASKS["webhooks"]].apply_async((-1, now))
        app.tasks[TASKS["reports"]].apply_async(
            (-1, now), {"tenant": self.config.tenant_id("warm-up")}
        )

    def ready(self) -> bool:
        self._check_worker("starting")
        self._read()
        return self.warm == set(POOLS)

    def load_and_drain(self, app: Any) -> None:
        session, result, config = self.session, self.result, self.config
        timeline = result.timeline
        plan = workload(timeline)
        result.start = start = time.time() + 0.2
        session.downstream.follow(start, timeline)
        for pool in POOLS:
            mine = [sub for sub in plan if sub.pool == pool]
            thread = threading.Thread(
                target=produce,
                args=(app, config, mine, start, result.sent, self.stop),
                name=f"demo-producer-{pool}",
                daemon=True,
            )
            self.threads.append(thread)
        self.threads.append(
            threading.Thread(
                target=sample_depths,
                args=(self.client, queue_keys(config), start, result, self.stop),
                name="demo-depth-sampler",
                daemon=True,
            )
        )
        for thread in self.threads:
            thread.start()
        label = LABELS[self.mode]
        drain_until = start + timeline.duration + session.drain_limit
        last_remember = 0.0
        while True:
            now = time.time()
            elapsed = now - start
            self._read()
            producing = any(t.is_alive() for t in self.threads[:-1])
            draining = elapsed >= timeline.duration and not producing
            session.progress.update(label, self._snapshot(elapsed, draining))
            if draining:
                admitted = sum(1 for s in result.sent if s.outcome == "sent")
                if len(result.records) >= admitted or now > drain_until:
                    break
            self._check_worker("running")
            if time.monotonic() - last_remember > 1.0:
                session.processes.remember_all()
                last_remember = time.monotonic()
            time.sleep(0.2)
        result.timings["load"] = timeline.duration
        result.timings["drain"] = time.time() - start - timeline.duration
        self._read()
        session.progress.update(label, self._snapshot(time.time() - start, True), final=True)

    def scrape(self) -> None:
        if self.metrics_port is None:
            return
        for i, pool in enumerate(POOLS):
            try:
                self.result.metrics[pool] = scrape_metrics(self.metrics_port + i)
            except (OSError, ValueError):
                self.result.metrics[pool] = {}

    def finish(self) -> None:
        """Stop the producers and the sampler; keep what the downstream counted."""
        if self.stop.is_set():
            return
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=5)
        if self.result.start:
            self.result.calls = dict(self.session.downstream.calls)
        self.session.downstream.follow(None, None)

    def forget(self) -> None:
        """Delete the run's keys on a Redis shared with others (a private one just stops)."""
        if not self.session.broker.private:
            with contextlib.suppress(Exception):
                _delete_keys(self.client, self.config)
        self.client.close()


def _delete_keys(client: Any, config: DemoConfig) -> None:
    """Every key the run wrote on a Redis it shares with others, and only those."""
    from celery_bulkhead.tenants import bucket_key, lease_key
    from celery_bulkhead.tenants.redis import throttled_key

    from .story import FLOOD_TENANT, QUIET_TENANTS

    keys = list(client.scan_iter(match=f"{config.prefix}:*", count=500))
    keys += list(client.scan_iter(match=f"bulkhead:{{breaker:{config.breaker_name}}}:*"))
    tenants = [config.tenant_id(t) for t in (*QUIET_TENANTS, FLOOD_TENANT, "warm-up")]
    keys += [bucket_key("reports", t) for t in tenants]
    keys += [lease_key("reports", t) for t in tenants]
    if keys:
        client.delete(*keys)
    client.zrem(throttled_key("reports"), *tenants)


def run_both(
    session: Session, duration: float, meanwhile: Callable[[], None] | None = None
) -> list[RunResult]:
    """Run the story as plain Celery (A), then with bulkheads (B); always stop what started.

    Both runs' workers start together and are ready before either run begins,
    and stop together after both: each run shares the machine with the other
    run's idle workers, the same for both.  ``meanwhile`` is called after the
    runs, before the workers stop (the report's imports overlap their stop).
    """
    progress = session.progress
    runs = [_Run(session, mode, duration) for mode in ("plain", "bulkhead")]
    apps: dict[str, Any] = {}
    began = time.monotonic()
    try:
        progress.say("Starting the workers of both runs (A: one worker; B: one per pool)...")
        for run in runs:
            run.start_workers()
            apps[run.mode] = make_app(run.config)
            run.send_warm_up(apps[run.mode])
        deadline = time.monotonic() + READY_TIMEOUT
        while not all([run.ready() for run in runs]):  # a list: every run is checked
            if time.monotonic() > deadline:
                tails = "\n".join(run.worker.log_tail() for run in runs if run.worker)
                raise DemoError(f"the workers were not ready in {READY_TIMEOUT:g} s:\n{tails}")
            session.processes.remember_all()
            time.sleep(0.1)
        ready = time.monotonic() - began
        progress.say(f"   ready in {ready:.1f} s")
        progress.say()
        for run in runs:
            run.result.timings["ready"] = ready
            _announce(progress, run)
            run.load_and_drain(apps[run.mode])
            run.scrape()
            run.finish()
            timings = run.result.timings
            progress.say(
                f"   {run.result.label}: load {timings['load']:.0f} s, drained in "
                f"{timings['drain']:.1f} s"
            )
            progress.say()
        if meanwhile is not None:
            meanwhile()
    finally:
        for app in apps.values():
            with contextlib.suppress(Exception):
                app.close()
        for run in runs:
            run.finish()
        workers = [run.worker for run in runs if run.worker is not None]
        stopped = session.processes.stop_many(workers, 15.0)
        for run in runs:
            run.result.timings["stop"] = stopped
            run.forget()
    return [run.result for run in runs]


def _announce(progress: Progress, run: _Run) -> None:
    progress.say(f"{run.result.label}  {run.result.title}")
    if run.metrics_port is not None:
        ports = ", ".join(f":{run.metrics_port + i} {pool}" for i, pool in enumerate(POOLS))
        progress.say(
            f"   each pool worker's Prometheus metrics: http://127.0.0.1:PORT/metrics ({ports})"
        )
