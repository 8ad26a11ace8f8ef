"""Shared plumbing for the benchmarks in ``bench/``.

Every benchmark script (``isolation.py`` and the ones that follow) gets the
same ground rules from here:

* ``--broker`` picks the broker: a URL (``redis://``, ``rediss://``,
  ``amqp://``, ``amqps://``, ``pyamqp://``) or the shorthand ``redis`` or
  ``rabbitmq`` (:data:`BROKER_URLS`, both on loopback); without it,
  ``$CELERY_BROKER_URL``, else ``redis``.  Celery lets that variable override
  every app's broker, so a run sets it to the chosen URL for itself and its
  workers;
* ``--records`` (default ``$BENCH_RECORDS_URL``) is the Redis the bench tasks
  write their timing records to; by default the broker itself on Redis, and
  the ``redis`` shorthand's URL on RabbitMQ;
* a :class:`Run` owns everything the script creates: a run-unique name prefix
  (``bench-<script>-<time>-<random>``) for queues, exchanges and Redis keys,
  the worker subprocesses (each in its own session), a SIGALRM hard limit,
  and the cleanup of its queues and keys when it ends, however it ends;
* workers are stopped with SIGTERM and, after a timeout, SIGKILL of their
  process groups (and of the groups of the workers they started: ``celery
  bulkhead worker`` runs each pool's worker in a session of its own);
* :func:`wait_for` waits for a condition instead of sleeping a fixed time;
* :func:`percentile`, :func:`print_table` and :func:`write_json` report.

Scripts are run from the repository root as ``python bench/<name>.py``;
workers get ``bench/`` on their ``PYTHONPATH`` so ``-A <bench app module>``
imports.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import redis
from kombu.utils.url import maybe_sanitize_url

__all__ = [
    "BENCH_DIR",
    "BROKER_URLS",
    "ENV_BROKER",
    "ENV_CELERY_BROKER",
    "ENV_PREFIX",
    "ENV_RECORDS",
    "REPO_ROOT",
    "WORKER_FLAGS",
    "BenchError",
    "HardLimitExceeded",
    "Run",
    "Worker",
    "base_parser",
    "broker_kind",
    "celery_settings",
    "default_broker_url",
    "environment",
    "fmt_ms",
    "free_port",
    "parse_args",
    "percentile",
    "print_table",
    "public_args",
    "records_url_for",
    "resolve_broker",
    "wait_for",
    "write_json",
]

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

#: The ``--broker`` shorthands, on loopback.  Anything else: pass a URL.
BROKER_URLS: dict[str, str] = {
    "redis": "redis://127.0.0.1:6379/12",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
}
#: URL scheme -> broker kind.  Only these two: the runner cleans up, and the
#: worker bench reads queue depths, in each broker's own way.
_SCHEMES = {
    "redis": "redis",
    "rediss": "redis",
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "pyamqp": "rabbitmq",
}

#: Celery reads it in every app, over the app's own ``broker_url``.
ENV_CELERY_BROKER = "CELERY_BROKER_URL"
#: Celery's per-direction overrides; a bench run refuses them (one URL only).
_ENV_CELERY_SPLIT = ("CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL")

#: Environment variables the runner sets for worker processes; bench app
#: modules read them at import time.  ``BENCH_RECORDS_URL`` is also the
#: default of ``--records``.
ENV_BROKER = "BENCH_BROKER_URL"
ENV_PREFIX = "BENCH_PREFIX"
ENV_RECORDS = "BENCH_RECORDS_URL"

#: Flags every bench worker runs with: no cluster chatter during measurement.
WORKER_FLAGS: tuple[str, ...] = (
    "--without-gossip",
    "--without-mingle",
    "--without-heartbeat",
    "--loglevel",
    "WARNING",
)

#: After the hard limit fires, cleanup gets this long before workers are
#: SIGKILLed and the script exits with status 3.
CLEANUP_GRACE = 60

T = TypeVar("T")


# -- brokers -------------------------------------------------------------------


def broker_kind(url: str) -> str:
    """``"redis"`` or ``"rabbitmq"`` for a broker URL; ValueError for anything else."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    kind = _SCHEMES.get(scheme)
    if kind is None:
        raise ValueError(
            f"unsupported broker {maybe_sanitize_url(url)!r}: a URL with scheme "
            f"{', '.join(sorted(_SCHEMES))}, or one of {', '.join(sorted(BROKER_URLS))}"
        )
    return kind


def resolve_broker(value: str) -> tuple[str, str]:
    """``(kind, url)`` for a ``--broker`` value: a shorthand or a URL."""
    url = BROKER_URLS.get(value, value)
    return broker_kind(url), url


def default_broker_url() -> str:
    """The broker when none is given: ``$CELERY_BROKER_URL``, else the ``redis`` shorthand."""
    return os.environ.get(ENV_CELERY_BROKER) or BROKER_URLS["redis"]


def records_url_for(broker_url: str, records: str | None = None) -> str:
    """Where timing records go: ``records``, ``$BENCH_RECORDS_URL``, the Redis broker,
    else the ``redis`` shorthand's URL."""
    url = records or os.environ.get(ENV_RECORDS)
    if url == "redis":
        url = BROKER_URLS["redis"]
    if url is None:
        url = broker_url if broker_kind(broker_url) == "redis" else BROKER_URLS["redis"]
    if broker_kind(url) != "redis":
        raise ValueError(f"records need Redis, not {maybe_sanitize_url(url)!r}")
    return url


class BenchError(RuntimeError):
    """A benchmark could not run as intended (worker died, condition timed out)."""


class HardLimitExceeded(BaseException):
    """The run's SIGALRM hard limit fired.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on
    the way up swallows it and the cleanup in :meth:`Run.__exit__` runs.
    """


def celery_settings(broker_url: str, prefix: str) -> dict[str, Any]:
    """Celery settings shared by bench apps: no results, no remote control.

    Routing, prefetch and acknowledgement stay at Celery's defaults.

    On Redis every broker key gets ``<prefix>:`` in front (kombu's
    ``global_keyprefix``), so the run's cleanup finds all of them, including
    kombu's ``unacked`` bookkeeping and exchange bindings.
    """
    settings: dict[str, Any] = {
        "task_ignore_result": True,
        "task_default_queue": f"{prefix}.default",
        "task_default_exchange": f"{prefix}.default",
        "task_default_routing_key": f"{prefix}.default",
        "worker_enable_remote_control": False,
        "worker_send_task_events": False,
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
    }
    if broker_url.startswith("redis"):
        settings["broker_transport_options"] = {"global_keyprefix": f"{prefix}:"}
    else:
        # An idle AMQP worker's event loop sleeps up to 10 s between timers,
        # and notices a SIGTERM (warm shutdown) only when it wakes.  Checking
        # the (default 120 s) broker heartbeat 120 times per interval wakes it
        # every second; it sends no extra frames and does not touch delivery.
        settings["broker_heartbeat_checkrate"] = 120
    return settings


# -- waiting and statistics ------------------------------------------------------


def wait_for(
    predicate: Callable[[], T],
    *,
    timeout: float,
    what: str,
    interval: float = 0.01,
    workers: Sequence[Worker] = (),
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that.

    Raises BenchError after ``timeout`` seconds, or as soon as one of
    ``workers`` has exited (with the tail of its log).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for worker in workers:
            if not worker.alive():
                raise BenchError(
                    f"worker {worker.label!r} exited (code {worker.process.returncode}) "
                    f"while waiting for {what}:\n{worker.log_tail()}"
                )
        if time.monotonic() >= deadline:
            tails = "".join(f"\n--- {w.label} ---\n{w.log_tail()}" for w in workers)
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}{tails}")
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the kernel's pick; racy, but fine here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear interpolation; NaN when empty."""
    data = sorted(values)
    if not data:
        return math.nan
    rank = (len(data) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


def fmt_ms(value: float) -> str:
    """Milliseconds with sensible precision for a table cell."""
    if math.isnan(value):
        return "-"
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


# -- worker processes --------------------------------------------------------------


def _start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` (to tell it from a reused pid), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may contain spaces, skip past it.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _descendants(pid: int) -> list[int]:
    """Pids of every living descendant of ``pid`` (Linux /proc walk)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class Worker:
    """A worker subprocess started by :meth:`Run.start_worker`, in its own session."""

    label: str
    argv: list[str]
    process: subprocess.Popen[bytes]
    log_path: Path
    #: pid -> kernel start time of every process of this worker seen so far.
    known: dict[int, int | None] = field(default_factory=dict)
    stop_seconds: float | None = None

    def alive(self) -> bool:
        return self.process.poll() is None

    def _remember_tree(self) -> None:
        for pid in [self.process.pid, *_descendants(self.process.pid)]:
            self.known.setdefault(pid, _start_time(pid))

    def _living(self) -> list[int]:
        return [pid for pid, start in self.known.items() if start and _start_time(pid) == start]

    def kill(self) -> None:
        """SIGKILL the process group of every process of this worker."""
        if self.alive():
            self._remember_tree()
        for pid in self._living():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                pgid = os.getpgid(pid)
                # Only groups led by one of our own processes (start_new_session).
                if pgid in self.known:
                    os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)

    def stop(self, timeout: float = 30.0) -> float:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; return seconds taken."""
        started = time.monotonic()
        if self.alive():
            self._remember_tree()
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"  ! worker {self.label!r} ignored SIGTERM for {timeout:g} s: SIGKILL")
                self.kill()
        # The top process is gone; what is left (a pool worker its supervisor
        # lost track of) gets a moment, then SIGKILL of its process group.
        deadline = time.monotonic() + 2.0
        while self._living() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._living():
            self.kill()
        self.stop_seconds = time.monotonic() - started
        return self.stop_seconds

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


# -- the run -------------------------------------------------------------------


class Run:
    """One benchmark invocation: its names, workers, hard limit and cleanup.

    Use as a context manager; on exit (normal, exception, Ctrl-C, SIGTERM or
    hard limit) it stops every worker it started and deletes the queues,
    exchanges and Redis keys it created.
    """

    def __init__(
        self,
        script: str,
        broker_url: str,
        *,
        records_url: str | None = None,
        hard_limit: float,
        keep_logs: bool = False,
    ) -> None:
        #: ``"redis"`` or ``"rabbitmq"``.
        self.broker = broker_kind(broker_url)
        self.broker_url = broker_url
        self.records_url = records_url_for(broker_url, records_url)
        #: The broker URL with its password masked, for output.
        self.where = maybe_sanitize_url(broker_url)
        self.prefix = f"bench-{script}-{time.strftime('%H%M%S')}-{secrets.token_hex(3)}"
        self.hard_limit = hard_limit
        self.keep_logs = keep_logs
        self.records = redis.Redis.from_url(self.records_url)
        #: The broker's own Redis (kombu's keys), or None on RabbitMQ.
        self.broker_redis: redis.Redis | None = None
        if self.broker == "redis":
            same = broker_url == self.records_url
            self.broker_redis = self.records if same else redis.Redis.from_url(broker_url)
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.workers: list[Worker] = []
        self._queues: set[str] = set()
        self._exchanges: set[str] = set()
        self._failed = False
        self._previous_handlers: dict[int, Any] = {}
        self._previous_env: dict[str, str | None] = {}

    # -- names -----------------------------------------------------------------

    def scope(self, label: str) -> str:
        """A name prefix for one part of the run (``<run prefix>.<label>``)."""
        return f"{self.prefix}.{label}"

    def env(self, prefix: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a worker: broker URL, name prefix, bench/ importable.

        ``extra`` adds (or overrides) variables, e.g. settings a bench app reads.
        """
        env = dict(os.environ)
        path = [str(BENCH_DIR), str(REPO_ROOT), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        env[ENV_BROKER] = self.broker_url
        env[ENV_CELERY_BROKER] = self.broker_url
        env[ENV_RECORDS] = self.records_url
        env[ENV_PREFIX] = prefix
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env

    def track_app(self, app: Any) -> None:
        """Remember every queue and exchange of a Celery app, for cleanup."""
        for name, queue in app.amqp.queues.items():
            self._queues.add(str(name))
            if queue.exchange is not None and queue.exchange.name:
                self._exchanges.add(str(queue.exchange.name))

    # -- workers ---------------------------------------------------------------

    def start_worker(
        self,
        label: str,
        celery_args: Sequence[str],
        *,
        prefix: str,
        env: Mapping[str, str] | None = None,
    ) -> Worker:
        """Start ``python -m celery <celery_args>`` in its own session.

        ``env``: extra environment variables for the worker (see :meth:`env`).
        """
        argv = [sys.executable, "-m", "celery", *celery_args]
        log_path = self.log_dir / f"{label}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=self.env(prefix, env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(label, argv, process, log_path)
        worker.known[process.pid] = _start_time(process.pid)
        self.workers.append(worker)
        return worker

    def stop_worker(self, worker: Worker, timeout: float = 30.0) -> float:
        seconds = worker.stop(timeout)
        if worker in self.workers:
            self.workers.remove(worker)
        return seconds

    def kill_all(self) -> None:
        for worker in list(self.workers):
            worker.kill()

    # -- cleanup -----------------------------------------------------------------

    def cleanup(self, scope: str | None = None) -> None:
        """Delete the Redis keys and broker queues/exchanges under ``scope``.

        ``scope`` defaults to the whole run.  Redis: every key starting with
        it in the records database and, on a Redis broker, in the broker's
        database (kombu's keys carry the prefix).  RabbitMQ:
        ``queue_delete``/``exchange_delete`` of the tracked names.
        """
        scope = scope or self.prefix
        if not scope.startswith(self.prefix):
            raise ValueError(f"{scope!r} is not part of this run ({self.prefix!r})")
        clients = [self.records]
        if self.broker_redis is not None and self.broker_redis is not self.records:
            clients.append(self.broker_redis)
        for client in clients:
            batch: list[bytes] = []
            for key in client.scan_iter(match=f"{scope}*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    client.delete(*batch)
                    batch.clear()
            if batch:
                client.delete(*batch)
        if self.broker == "rabbitmq":
            queues = sorted(q for q in self._queues if q.startswith(scope))
            exchanges = sorted(e for e in self._exchanges if e.startswith(scope))
            self._amqp_delete(queues, exchanges)
            self._queues.difference_update(queues)
            self._exchanges.difference_update(exchanges)

    def _amqp_delete(self, queues: Sequence[str], exchanges: Sequence[str]) -> None:
        if not queues and not exchanges:
            return
        from kombu import Connection

        with Connection(self.broker_url, connect_timeout=5) as conn:
            channel: Any = conn.channel()
            actions = [("queue", q) for q in queues] + [("exchange", e) for e in exchanges]
            for kind, name in actions:
                try:
                    if kind == "queue":
                        channel.queue_delete(queue=name)
                    else:
                        channel.exchange_delete(exchange=name)
                except conn.channel_errors as exc:
                    # A NOT_FOUND closes the channel; carry on with a new one.
                    print(f"  ! could not delete {kind} {name!r}: {exc}")
                    channel = conn.channel()
            with contextlib.suppress(Exception):
                channel.close()

    # -- lifecycle ---------------------------------------------------------------

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        # Second stage: cleanup itself hung.  Kill what we started and leave.
        signal.signal(signal.SIGALRM, self._on_second_alarm)
        signal.alarm(CLEANUP_GRACE)
        raise HardLimitExceeded(f"hard limit of {self.hard_limit:g} s reached")

    def _on_second_alarm(self, signum: int, frame: FrameType | None) -> None:
        print(f"cleanup did not finish within {CLEANUP_GRACE} s: killing workers", flush=True)
        self.kill_all()
        os._exit(3)

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def __enter__(self) -> Run:
        for signum, handler in (
            (signal.SIGALRM, self._on_alarm),
            (signal.SIGTERM, self._on_term),
        ):
            self._previous_handlers[signum] = signal.signal(signum, handler)
        # Celery prefers CELERY_BROKER_URL to an app's broker_url: make it
        # agree; bench apps built here find their records where workers do.
        for name, value in ((ENV_CELERY_BROKER, self.broker_url), (ENV_RECORDS, self.records_url)):
            self._previous_env[name] = os.environ.get(name)
            os.environ[name] = value
        signal.alarm(max(1, math.ceil(self.hard_limit)))
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._failed = exc_type is not None
        if exc_type is not None and not issubclass(exc_type, HardLimitExceeded):
            # Leave cleanup the same grace as after a hard limit.
            signal.signal(signal.SIGALRM, self._on_second_alarm)
            signal.alarm(CLEANUP_GRACE)
        try:
            for worker in list(self.workers):
                if self._failed:
                    print(f"--- last log lines of {worker.label} ---\n{worker.log_tail()}")
                self.stop_worker(worker, timeout=15.0)
            self.cleanup()
        finally:
            signal.alarm(0)
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)
            for name, previous in self._previous_env.items():
                if previous is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = previous
            self.records.close()
            if self.broker_redis is not None and self.broker_redis is not self.records:
                self.broker_redis.close()
            if self._failed or self.keep_logs:
                print(f"worker logs kept in {self.log_dir}")
            else:
                for path in self.log_dir.iterdir():
                    path.unlink()
                self.log_dir.rmdir()


# -- command line and reporting --------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every bench script has."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--broker",
        metavar="URL|redis|rabbitmq",
        default=argparse.SUPPRESS,  # resolved by parse_args (the help says how)
        help=(
            "broker URL (redis://, rediss://, amqp://, amqps://, pyamqp://) or a shorthand: "
            f"redis = {BROKER_URLS['redis']}, rabbitmq = {BROKER_URLS['rabbitmq']}; "
            f"default: ${ENV_CELERY_BROKER}, else redis"
        ),
    )
    parser.add_argument(
        "--records",
        metavar="URL",
        default=argparse.SUPPRESS,
        help=(
            "Redis URL for the tasks' timing records; default: "
            f"${ENV_RECORDS}, else the broker on Redis, else {BROKER_URLS['redis']}"
        ),
    )
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write results as JSON")
    parser.add_argument(
        "--hard-limit",
        metavar="SECONDS",
        type=float,
        default=None,
        help="abort (and clean up) after this long; default: derived from the options",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker logs")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, then resolve the broker: ``args.broker`` becomes ``"redis"`` or
    ``"rabbitmq"``, with the URLs in ``args.broker_url`` and ``args.records_url``."""
    args = parser.parse_args(argv)
    for name in _ENV_CELERY_SPLIT:
        if os.environ.get(name):
            parser.error(f"unset {name}: Celery would prefer it to the bench's broker")
    try:
        broker = getattr(args, "broker", None) or default_broker_url()
        args.broker, args.broker_url = resolve_broker(broker)
        args.records_url = records_url_for(args.broker_url, getattr(args, "records", None))
    except ValueError as exc:
        parser.error(str(exc))
    return args


def public_args(args: argparse.Namespace) -> dict[str, Any]:
    """``vars(args)`` for a JSON report: paths as strings, passwords in URLs masked."""
    public: dict[str, Any] = {}
    for key, value in vars(args).items():
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, str) and "://" in value:
            value = maybe_sanitize_url(value)
        public[key] = value
    return public


def print_table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None
) -> None:
    """Print a Markdown-style table, numbers right-aligned."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str], first: bool = False) -> str:
        parts = [
            cell.ljust(width) if i == 0 or first else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "| " + " | ".join(parts) + " |"

    if title:
        print(f"\n{title}")
    print(line(cells[0], first=True))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print(line(row))


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    versions = {}
    for package in ("celery", "kombu", "redis", "amqp", "celery-bulkhead"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "packages": versions,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    print(f"\nresults written to {path}")
