"""``celery -A app bulkhead ...``: the command line, a ``celery`` subcommand.

Registered through the ``celery.commands`` entry point, so it is available
wherever ``celery`` is, with the app loaded from ``-A`` as usual.
"""

from __future__ import annotations

import json
import logging
import shlex
import signal
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import click
from celery.bin.base import CeleryCommand

from . import sizing
from .bulkhead import Bulkhead, installed_on
from .errors import ConfigurationError
from .pool import Pool
from .routing import consumed_queues
from .status import Report, report, unknown
from .supervisor import Supervisor, WorkerSpec
from .tenants.limiter import Limiter
from .topology import Finding, topology

__all__ = ["bulkhead"]

#: Seconds `status` waits beyond its worst case before it reports the broker as unknown.
_DEADLINE_SLACK = 2.0


# -- per-pool `celery worker` command lines, for `worker` and `plan` --------------


def pool_worker_argv(
    pool: Pool,
    app: str | None,
    extra: Sequence[str] = (),
    *,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> list[str]:
    """Arguments after ``celery`` that run one node for ``pool``."""
    argv = ["-A", app] if app else []
    argv += [
        "worker",
        "--queues",
        ",".join(consumed_queues(pool)),
        "--concurrency",
        str(pool.concurrency),
        "--hostname",
        f"{pool.name}@%h",
        "--pool",
        pool.worker_pool,
        "--prefetch-multiplier",
        str(pool.prefetch_multiplier),
    ]
    if pool.time_limit is not None:
        argv += ["--time-limit", _seconds(pool.time_limit)]
    if pool.soft_time_limit is not None:
        argv += ["--soft-time-limit", _seconds(pool.soft_time_limit)]
    if metrics_port is not None:
        argv += ["--bulkhead-metrics-port", str(metrics_port)]
        if metrics_host != "127.0.0.1":
            argv += ["--bulkhead-metrics-host", metrics_host]
    argv += ["--bulkhead-pool", pool.name, *extra]
    return argv


def default_worker_argv(pools: Sequence[Pool], app: str | None) -> list[str]:
    """Arguments for a worker serving every queue except the pools' (tasks in no pool)."""
    argv = ["-A", app] if app else []
    excluded = [name for pool in pools for name in consumed_queues(pool)]
    return [*argv, "worker", "--exclude-queues", ",".join(excluded)]


def shell_line(argv: Sequence[str], program: str = "celery") -> str:
    return " ".join(shlex.quote(part) for part in (program, *argv))


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# -- commands ------------------------------------------------------------------


def _bulkhead(ctx: click.Context) -> Bulkhead:
    app = ctx.obj.app
    try:
        bulkhead = installed_on(app)
        # The modules workers import (include=, imports=, Django's autodiscovery)
        # are imported here too, so a bad pool name fails now, not in a restart loop.
        app.loader.import_default_modules()
        bulkhead.validate_tasks()
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from exc
    return bulkhead


def _app_spec(ctx: click.Context) -> str | None:
    value = ctx.find_root().params.get("app")
    return str(value) if value else None


def _selected(bulkhead: Bulkhead, names: Sequence[str]) -> list[Pool]:
    if not names:
        return list(bulkhead.pools)
    try:
        return [bulkhead.pool(name) for name in dict.fromkeys(names)]
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="--pool") from exc


def _argv(bulkhead: Bulkhead, pool: Pool, app: str | None, extra: Sequence[str] = ()) -> list[str]:
    return pool_worker_argv(
        pool,
        app,
        extra,
        metrics_port=bulkhead.metrics_port_of(pool),
        metrics_host=bulkhead.metrics_host,
    )


@click.group(name="bulkhead")
def bulkhead() -> None:
    """Bulkhead pools: per-pool workers and their plans."""


@bulkhead.command(
    cls=CeleryCommand,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.option(
    "--pool",
    "-p",
    "pools",
    multiple=True,
    metavar="NAME",
    help="Run only this pool (repeatable). Default: every pool.",
)
@click.argument("worker_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def worker(ctx: click.Context, pools: tuple[str, ...], worker_args: tuple[str, ...]) -> None:
    """Start one supervised `celery worker` per pool.

    Each worker consumes only its pool's queue, with the pool's concurrency,
    prefetch and time limits, and is named <pool>@<host>. SIGTERM drains
    every pool within its drain_timeout, then stops it hard. Arguments after
    the options (e.g. `-- --loglevel INFO`) are passed to every worker.
    """
    bulkhead = _bulkhead(ctx)
    selected = _selected(bulkhead, pools)
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s: %(levelname)s/bulkhead] %(message)s"
    )
    app = _app_spec(ctx)
    specs = [
        WorkerSpec(
            pool.name,
            [sys.executable, "-m", "celery", *_argv(bulkhead, pool, app, worker_args)],
            pool.drain_timeout,
            # Only prefork can cancel a running task on cold shutdown.
            signal.SIGQUIT if pool.worker_pool == "prefork" else None,
        )
        for pool in selected
    ]
    ctx.exit(Supervisor(specs).run())


@bulkhead.command(cls=CeleryCommand)
@click.option(
    "--pool", "-p", "pools", multiple=True, metavar="NAME", help="Only this pool (repeatable)."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["shell", "procfile"]),
    default="shell",
    show_default=True,
    help="shell: one command per line; procfile: Procfile entries.",
)
@click.pass_context
def plan(ctx: click.Context, pools: tuple[str, ...], fmt: str) -> None:
    """Print the `celery worker` command for each pool (Procfile/systemd/Kubernetes)."""
    bulkhead = _bulkhead(ctx)
    app = _app_spec(ctx)
    selected = _selected(bulkhead, pools)
    lines: list[tuple[str, str, Any]] = [
        (pool.name, shell_line(_argv(bulkhead, pool, app)), pool) for pool in selected
    ]
    if not pools:
        lines.append(("default", shell_line(default_worker_argv(bulkhead.pools, app)), None))
    for name, line, pool in lines:
        if fmt == "procfile":
            click.echo(f"{name}: {line}")
            continue
        if pool is None:
            click.echo("# tasks in no pool: every other queue")
        else:
            click.echo(
                f"# pool {pool.name}: queue {pool.queue}, concurrency {pool.concurrency}, "
                f"drain_timeout {pool.drain_timeout:g}s (stop with SIGTERM, "
                f"then wait that long before SIGKILL)"
            )
        click.echo(line)


@bulkhead.command(cls=CeleryCommand)
@click.option("--pool", "-p", "pools", multiple=True, metavar="NAME", help="Only this pool.")
@click.option(
    "--timeout",
    type=float,
    default=1.0,
    show_default=True,
    help="Seconds to wait for workers to answer.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def status(ctx: click.Context, pools: tuple[str, ...], timeout: float, as_json: bool) -> None:
    """Per pool: queue, depth/cap, consumers, in-flight.

    Exit 1 if a pool has no consumer, 2 if the broker cannot be reached (then
    depth, consumers and in-flight are shown as unknown).
    """
    bulkhead = _bulkhead(ctx)
    selected = _selected(bulkhead, pools)
    result = _report_within(ctx.obj.app, selected, timeout)
    statuses = result.pools
    throttled = _throttled(bulkhead, selected, timeout) if result.broker_error is None else {}
    if as_json:
        rows = [
            {**s.as_dict(), **({"throttled": throttled[s.pool]} if s.pool in throttled else {})}
            for s in statuses
        ]
        click.echo(json.dumps(rows, indent=2))
    else:
        header = f"{'POOL':<16} {'QUEUE':<32} {'DEPTH/CAP':>12} {'CONSUMERS':>9} {'IN-FLIGHT':>12}"
        click.echo(header)
        for s in statuses:
            depth = "?" if s.depth is None else str(s.depth)
            cap = "-" if s.cap is None else str(s.cap)
            consumers = "?" if s.consumers is None else str(len(s.consumers))
            if s.inflight is None or s.consumers is None:
                inflight = "?"
            else:
                inflight = f"{s.inflight}/{s.concurrency * max(1, len(s.consumers))}"
            click.echo(
                f"{s.pool:<16} {s.queue:<32} {depth + '/' + cap:>12} {consumers:>9} {inflight:>12}"
            )
        for name, tenants in throttled.items():
            if tenants is None:
                click.echo(f"{name}: most throttled tenants: ? (tenant state unreachable)")
            elif tenants:
                # ascii(): ids are untrusted; what reaches a terminal is escaped.
                listed = ", ".join(f"{tenant!a} ({count})" for tenant, count in tenants)
                click.echo(f"{name}: most throttled tenants (last 10 min): {listed}")
    if result.broker_error is not None:
        click.echo(f"{result.broker_error} (depth, consumers and in-flight unknown)", err=True)
        ctx.exit(2)
    missing = [s.pool for s in statuses if not s.consumers]
    if missing:
        click.echo(f"no consumer for pool(s): {', '.join(missing)}", err=True)
        ctx.exit(1)


def _throttled(
    bulkhead: Bulkhead, pools: Sequence[Pool], timeout: float
) -> dict[str, list[tuple[str, int]] | None]:
    """The most throttled tenants of each pool with a tenant limit (None: state unreachable)."""
    if bulkhead.limiter is None:
        return {}
    limiter = Limiter(bulkhead.limiter.state_url, timeout)
    found: dict[str, list[tuple[str, int]] | None] = {}
    for pool in pools:
        if pool.tenant is None:
            continue
        try:
            found[pool.name] = limiter.most_throttled(pool, 5)
        except Exception:
            found[pool.name] = None
    return found


def _report_within(app: Any, pools: list[Pool], timeout: float) -> Report:
    """:func:`report`, given up on after its worst case (connect, then two inspect rounds).

    The broker is probed before the workers are asked, but one that goes away
    in between would leave Celery's remote control retrying its publish with no
    limit: a status command must answer, so it answers "unknown" instead.
    """
    limit = 3 * timeout + _DEADLINE_SLACK
    outcome: list[Report | Exception] = []

    def run() -> None:
        try:
            outcome.append(report(app, pools, timeout))
        except Exception as exc:  # re-raised in the command's thread
            outcome.append(exc)

    # A daemon thread: one stuck in a retry loop does not keep the command alive.
    thread = threading.Thread(target=run, name="bulkhead-status", daemon=True)
    thread.start()
    thread.join(limit)
    if not outcome:
        return unknown(pools, f"broker did not answer within {limit:g}s")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


# -- size: Little's law (the arithmetic is in sizing.py) ------------------------


def _checked(parse: Callable[[Any, str], Any]) -> Callable[..., Any]:
    """An option callback: ``parse`` the value; its refusal is a click error naming the option."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return parse(value, param.name or "")
        except ConfigurationError as exc:
            raise click.BadParameter(_refusal(exc), ctx, param) from None

    return callback


def _refusal(exc: ConfigurationError) -> str:
    detail = f" ({exc.detail})" if exc.detail else ""
    return f"{exc.value!r} is not allowed; allowed: {exc.allowed}{detail}"


def _count(maximum: int) -> Callable[..., Any]:
    return _checked(lambda value, name: sizing.parse_count(value, name, maximum))


def _fraction(high: float, zero: bool) -> Callable[..., Any]:
    return _checked(lambda value, name: sizing.parse_fraction(value, name, high=high, zero=zero))


def _window(value: Any, name: str) -> float:
    try:
        seconds = sizing.parse_seconds(value, name)
    except ConfigurationError:
        seconds = 0.0
    if not 0.1 <= seconds <= 600:
        raise ConfigurationError(None, name, value, "seconds from 0.1 to 600, such as 5 or '500ms'")
    return seconds


def _scrape(url: str, pool: str | None) -> sizing.Snapshot:
    """One scrape of a pool worker's ``/metrics``; a click error naming ``--from`` if unusable."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise click.BadParameter(
            f"{url!r} is not allowed; allowed: an http:// or https:// URL such as "
            "http://127.0.0.1:9100/metrics",
            param_hint="--from",
        )
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read(16 * 2**20).decode("utf-8", "replace")
    except (OSError, ValueError) as exc:  # URLError, HTTPError and timeouts are OSErrors
        reason = getattr(exc, "reason", None) or exc
        raise click.BadParameter(f"{url!r} cannot be read: {reason}", param_hint="--from") from exc
    try:
        return sizing.read_metrics(text, pool)
    except sizing.MetricsError as exc:
        raise click.BadParameter(f"{url!r}: {exc}", param_hint="--from") from None


def _observe(urls: Sequence[str], pool: str | None, window: float) -> sizing.Observation:
    """Scrape every URL, wait ``window`` seconds, scrape again."""
    started = time.monotonic()
    first = [_scrape(url, pool) for url in urls]
    time.sleep(window)
    elapsed = time.monotonic() - started
    second = [_scrape(url, pool) for url in urls]
    try:
        return sizing.observe(first, second, elapsed)
    except sizing.MetricsError as exc:
        raise click.BadParameter(str(exc), param_hint="--from") from None


def _observed_lines(seen: sizing.Observation, urls: Sequence[str]) -> list[str]:
    where = urls[0] if len(urls) == 1 else f"{len(urls)} nodes"
    since = "in the window" if seen.from_window else "since the workers started"
    p99 = "?" if seen.p99 is None else f"{seen.p99:.3g} s"
    mean = "?" if seen.latency is None else f"{seen.latency:.3g} s"
    return [
        f"observed pool {seen.pool!r} at {where} for {seen.window:.1f} s: "
        f"{seen.finished:g} tasks finished, arrivals {seen.rate:.3g}/s "
        "(finished + queue and in-flight growth)",
        f"  latency mean {mean}, p99 {p99} (from {seen.samples:g} tasks {since})",
    ]


@bulkhead.command(cls=CeleryCommand)
@click.option(
    "--rate",
    callback=_checked(sizing.parse_rate),
    metavar="RATE",
    help="Arrivals: '200/s', '600/m', '3600/h'.",
)
@click.option(
    "--latency",
    callback=_checked(sizing.parse_seconds),
    metavar="SECONDS",
    help="Mean task run time.",
)
@click.option(
    "--p99",
    callback=_checked(sizing.parse_seconds),
    metavar="SECONDS",
    help="p99 run time (sized by it).",
)
@click.option(
    "--downstream",
    callback=_count(sizing.MAX_DOWNSTREAM),
    metavar="N",
    help="Most concurrent calls the downstream accepts, fleet-wide.",
)
@click.option(
    "--instances",
    callback=_count(sizing.MAX_INSTANCES),
    metavar="N",
    help="Worker nodes running the pool (default 1, or one per --from URL).",
)
@click.option(
    "--utilization",
    callback=_fraction(1.0, zero=False),
    metavar="FRACTION",
    help="Busy fraction to plan for: 0.7 (default) or '70%'.",
)
@click.option(
    "--headroom",
    callback=_fraction(sizing.MAX_HEADROOM, zero=True),
    metavar="FRACTION",
    help="Instead of --utilization: extra over Little's L, 0.2 or '20%'.",
)
@click.option(
    "--max-wait",
    callback=_checked(sizing.parse_seconds),
    metavar="SECONDS",
    help="Longest acceptable queue wait: suggests a max_queue.",
)
@click.option("--pool", "-p", "pool_name", metavar="NAME", help="Compare with this pool.")
@click.option(
    "--from",
    "urls",
    multiple=True,
    metavar="URL",
    help="Observe rate and latency from a pool worker's /metrics (repeatable: one per node).",
)
@click.option(
    "--window",
    callback=_checked(_window),
    default="5",
    show_default=True,
    metavar="SECONDS",
    help="Seconds between the two scrapes of --from.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the explanation.")
@click.pass_context
def size(
    ctx: click.Context,
    rate: float | None,
    latency: float | None,
    p99: float | None,
    downstream: int | None,
    instances: int | None,
    utilization: float | None,
    headroom: float | None,
    max_wait: float | None,
    pool_name: str | None,
    urls: tuple[str, ...],
    window: float,
    as_json: bool,
) -> None:
    """Workers a pool needs, by Little's law, with the arithmetic shown.

    Sized by the p99 when given, for a 70 % utilisation (or --headroom), per
    instance, and never above the --downstream limit. --from reads the arrival
    rate and latencies of a running pool worker instead; options given
    alongside it override what was observed.
    """
    pool = _selected(_bulkhead(ctx), [pool_name])[0] if pool_name else None
    seen = _observe(urls, pool_name, window) if urls else None
    if seen is not None:
        if rate is None and seen.rate <= 0:
            raise click.BadParameter(
                f"no task arrived at pool {seen.pool!r} in {seen.window:.1f} s: nothing to "
                "size from (use a longer --window, or give --rate)",
                param_hint="--from",
            )
        if latency is None and p99 is None and seen.latency is None:
            raise click.BadParameter(
                f"no task of pool {seen.pool!r} has finished yet: no latency to size from "
                "(wait for some, or give --latency)",
                param_hint="--from",
            )
        rate = seen.rate if rate is None else rate
        latency = (seen.latency or None) if latency is None else latency
        p99 = (seen.p99 or None) if p99 is None else p99
    elif rate is None or (latency is None and p99 is None):
        missing = "--rate" if rate is None else "--latency (or --p99)"
        raise click.UsageError(f"Missing option {missing}: give it, or observe with --from URL")
    assert rate is not None
    try:
        workload = sizing.Workload(
            rate=rate,
            latency=latency,
            p99=p99,
            downstream=downstream,
            instances=instances or max(1, len(urls)),
            utilization=utilization,
            headroom=headroom,
            max_wait=max_wait,
        )
    except ConfigurationError as exc:
        option = "--" + exc.setting.replace("_", "-")
        raise click.BadParameter(_refusal(exc), param_hint=option) from None
    plan = sizing.size(workload)
    lines: list[str] = []
    if pool is not None:
        lines = sizing.compare(plan, pool.name, pool.concurrency, pool.max_queue, pool.worker_pool)
    elif seen is not None and seen.concurrency is not None:
        per_node = seen.concurrency / seen.nodes
        lines = sizing.compare(plan, seen.pool, per_node, None)
    if as_json:
        data: dict[str, Any] = {
            **plan.as_dict(),
            "observed": None if seen is None else seen.as_dict(),
            "pool": None
            if pool is None
            else {"name": pool.name, "concurrency": pool.concurrency, "max_queue": pool.max_queue},
        }
        click.echo(json.dumps(data, indent=2))
        return
    if seen is not None:
        click.echo("\n".join(_observed_lines(seen, urls)))
    click.echo("\n".join([*plan.explain(), *lines]))


@bulkhead.command(cls=CeleryCommand)
@click.pass_context
def check(ctx: click.Context) -> None:
    """Lint the topology: task routes, pools and declared queues.

    One line per finding, naming the task, pool or queue. Exit 0 when clean,
    1 when something was found (the rules: docs/sizing.md).
    """
    app = ctx.obj.app
    try:
        bulkhead = installed_on(app)
    except ConfigurationError as exc:
        click.echo(str(Finding("error", "no-bulkhead", str(exc))))
        ctx.exit(1)
    try:
        # The modules workers import (include=, imports=, autodiscovery) too.
        app.loader.import_default_modules()
        found = topology(app, bulkhead)
    except ConfigurationError as exc:  # a task decorated into a pool that does not exist
        found = [Finding("error", "unknown-pool", f"{exc} (nothing else checked)")]
    for finding in found:
        click.echo(str(finding))
    if found:
        errors = sum(finding.severity == "error" for finding in found)
        click.echo(f"{errors} error(s), {len(found) - errors} warning(s)", err=True)
        ctx.exit(1)
    click.echo(f"no findings: {len(bulkhead.pools)} pool(s); routes, pools and queues agree")
