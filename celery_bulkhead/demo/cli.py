"""``python -m celery_bulkhead.demo``: the options, the two runs, the cleanup, the report.

Exit codes: 0 done (with ``--check``: and the bulkheads kept payments fast);
1 ``--check`` failed; 2 the demo could not run (a missing extra, no broker, a
worker that would not start); 130 interrupted (Ctrl-C, SIGTERM, SIGHUP).
Whatever the ending, every process the demo started is stopped and its
temporary directory removed before it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from .broker import EXTRA, DemoError, choose_broker
from .processes import Processes
from .progress import Progress
from .story import (
    FLOOD_SIZE,
    FLOOD_TENANT,
    PAYMENTS_RATE,
    QUIET_TENANTS,
    WEBHOOKS_RATE,
    Timeline,
)

__all__ = ["main"]

DEFAULT_DURATION = 25.0
QUICK_DURATION = 5.0
CHART_NAME = "bulkhead-demo.png"
_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m celery_bulkhead.demo",
        description=(
            "Run the same Celery workload twice, as plain Celery and with bulkheads, while a "
            "third-party API hangs and a tenant floods; measure and compare."
        ),
    )
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="a Redis to run on (redis://HOST:PORT/DB); default: $CELERY_BROKER_URL, else a "
        "private redis-server from PATH, else the embedded server",
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--quick",
        action="store_true",
        help=f"a short run for CI ({QUICK_DURATION:g} s of load per run)",
    )
    length.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help=f"seconds of load per run (default {DEFAULT_DURATION:g}; 4 to 600)",
    )
    parser.add_argument(
        "--output", metavar="DIR", default=".", help="where to write the chart (default: .)"
    )
    parser.add_argument("--no-chart", action="store_true", help="skip the chart (no matplotlib)")
    parser.add_argument("--json", metavar="PATH", help="also write a JSON summary here")
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 unless the bulkhead run's payments p99 is far below the plain run's "
        "and every cap held",
    )
    return parser


class _Signals:
    """Ctrl-C, SIGTERM or SIGHUP: stop cleanly; during the cleanup, or a second time: hurry.

    The first signal raises KeyboardInterrupt wherever the demo is, unless it is
    already cleaning up; any later one (or one during the cleanup) only makes the
    cleanup skip its grace periods (SIGKILL at once): nothing interrupts the cleanup.
    """

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.received: list[int] = []
        self._cleaning = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if len(self.received) == 1 and not self._cleaning:
            raise KeyboardInterrupt
        self.processes.hurry = True

    def cleaning(self) -> None:
        self._cleaning = True

    def __enter__(self) -> _Signals:
        for name in _SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, old in self._previous.items():
            signal.signal(signum, old)


@contextmanager
def _broker_environment(url: str | None) -> Iterator[None]:
    """Celery lets ``CELERY_BROKER_URL`` override any app's broker: point it at ours."""
    names = ("CELERY_BROKER_URL", "CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL")
    saved = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ.pop(name, None)
    if url is not None:
        os.environ["CELERY_BROKER_URL"] = url
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _introduce(progress: Progress, duration: float) -> None:
    t = Timeline(duration)
    say = progress.say
    say("celery-bulkhead demo: the same shop, the same work, run twice.")
    say(
        f"  payments: {PAYMENTS_RATE:g} fast charges a second.  webhooks: {WEBHOOKS_RATE:g} "
        f"calls a second to a third-party API"
    )
    say(
        f"  that hangs at {t.hang_at:.1f} s, fails (503) at {t.fail_at:.1f} s and recovers at "
        f"{t.recover_at:.1f} s."
    )
    say(
        f"  reports: {len(QUIET_TENANTS)} quiet tenants, and {FLOOD_TENANT} sends {FLOOD_SIZE} at "
        f"once at {t.flood_at:.1f} s.  {duration:g} s of load per run."
    )


def _preload_chart() -> None:
    """Import matplotlib while the workers start (its first import builds a font cache)."""

    def load() -> None:
        with contextlib.suppress(Exception):
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot

    threading.Thread(target=load, name="demo-chart-import", daemon=True).start()


@contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Warnings of Celery, kombu and celery-bulkhead in the producer go to a file, not the
    terminal (they would tear the live display)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    duration = args.duration or (QUICK_DURATION if args.quick else DEFAULT_DURATION)
    if not 4 <= duration <= 600:
        _parser().error("--duration must be between 4 and 600 seconds")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        _parser().error(f"--json: the directory of {args.json} does not exist")
    missing = [m for m in ("redis", "matplotlib") if importlib.util.find_spec(m) is None]
    if args.no_chart and "matplotlib" in missing:
        missing.remove("matplotlib")
    if missing:
        print(
            f"The demo needs {' and '.join(missing)}, which the demo extra brings:\n    {EXTRA}"
            + ("\n(or run with --no-chart to skip the chart)" if missing == ["matplotlib"] else ""),
            file=sys.stderr,
        )
        return 2

    from .downstream import Downstream
    from .measure import RunResult
    from .run import Session, run_both

    began = time.monotonic()
    progress = Progress(interval=3.0 if duration > 10 else 2.0)
    processes = Processes()
    temp = Path(tempfile.mkdtemp(prefix="bulkhead-demo-"))
    results: list[RunResult] = []
    failure: str | None = None
    interrupted = False
    broker_info: dict[str, str] = {}
    downstream: Downstream | None = None
    token = secrets.token_hex(3)
    with _Signals(processes) as signals, _log_to(temp / "demo.log"):
        try:
            _introduce(progress, duration)
            broker = choose_broker(args.broker, processes, temp)
            broker_info = {"kind": broker.kind, "description": broker.description}
            progress.say(f"  broker: {broker.description}")
            progress.say()
            with _broker_environment(broker.url):
                downstream = Downstream()
                session = Session(
                    broker=broker,
                    processes=processes,
                    downstream=downstream,
                    temp=temp,
                    token=token,
                    progress=progress,
                    drain_limit=max(10.0, duration / 2),
                )
                results = run_both(session, duration, None if args.no_chart else _preload_chart)
        except KeyboardInterrupt:
            interrupted = True
        except DemoError as exc:
            failure = str(exc)
        except Exception as exc:  # a bug or a broker gone mid-run: clean up, then say what
            traceback.print_exc()
            failure = f"{type(exc).__name__}: {exc}"
        finally:
            signals.cleaning()
            if downstream is not None:
                downstream.close()
            processes.stop_all(timeout=10.0)
            shutil.rmtree(temp, ignore_errors=True)
    elapsed = time.monotonic() - began
    summary: dict[str, Any] = {
        "broker": broker_info,
        "duration": duration,
        "elapsed_seconds": round(elapsed, 1),
        "processes": processes.started(),
        "temp_dir": str(temp),
        "key_prefix": f"bulkhead-demo-{token}",
    }
    if interrupted or failure:
        stopped = len(processes.started())
        if interrupted:
            print(f"\ninterrupted: {stopped} process(es) stopped, {temp} removed")
        else:
            print(f"\nthe demo could not run: {failure}", file=sys.stderr)
        summary["error"] = "interrupted" if interrupted else failure
        _write_json(args.json, summary)
        return 130 if interrupted else 2
    return _report(args, results, summary)


def _report(args: argparse.Namespace, results: list[Any], summary: dict[str, Any]) -> int:
    from .report import FAR_BELOW, as_json, fmt_seconds, render_table, summarize, verdict

    stats = {run.mode: summarize(run) for run in results}
    print(render_table([(f"{run.label} {run.mode}", stats[run.mode]) for run in results]))
    bulkhead = results[1]
    v = verdict(stats["plain"], stats["bulkhead"])
    print()
    unfinished = [
        f"{run.label} {s.pool}: {s.unfinished}"
        for run in results
        for s in stats[run.mode].values()
        if s.unfinished
    ]
    if unfinished:
        print(f"Not finished when the run ended (after its drain time): {', '.join(unfinished)}")
    down = {run.mode: run.calls.get("hanging", 0) + run.calls.get("failing", 0) for run in results}
    print(
        f"Calls that reached the webhooks' API while it hung or failed: plain {down['plain']}, "
        f"bulkheads {down['bulkhead']}."
    )
    if bulkhead.breaker:
        steps = ", ".join(f"{state} at {at:.1f} s" for at, state in bulkhead.breaker)
        print(f"Breaker on webhooks (B): {steps}.")
    if v.ratio is not None:
        times = 1 / v.ratio if v.ratio > 0 else float("inf")
        print(
            f"payments p99: plain {fmt_seconds(v.plain_p99)}, bulkheads "
            f"{fmt_seconds(v.bulkhead_p99)} ({times:.0f}x lower)."
        )
    if v.passed:
        print(
            "Verdict: with bulkheads, payments stayed fast while the webhooks' API hung and "
            f"a tenant flooded (p99 at most {FAR_BELOW:g} of plain Celery's), and every cap held."
        )
    else:
        print("Verdict: the bulkheads did NOT show what this demo claims on this machine:")
        for reason in v.reasons:
            print(f"  - {reason}")
    chart: str | None = None
    if not args.no_chart:
        from .report import write_chart

        path = write_chart(results, stats, Path(args.output).resolve() / "bulkhead-demo.png")
        chart = str(path)
        print(f"Chart: {chart}")
    print(f"Total time: {summary['elapsed_seconds']:.0f} s.")
    summary.update(
        {
            "check": {
                "passed": v.passed,
                "plain_payments_p99": v.plain_p99,
                "bulkhead_payments_p99": v.bulkhead_p99,
                "ratio": v.ratio,
                "far_below": FAR_BELOW,
                "caps_held": v.caps_held,
                "reasons": v.reasons,
            },
            "runs": {
                run.mode: {
                    "pools": as_json(stats[run.mode]),
                    "timings": run.timings,
                    "breaker": run.breaker,
                    "downstream_calls": run.calls,
                }
                for run in results
            },
            "chart": chart,
        }
    )
    _write_json(args.json, summary)
    return 1 if args.check and not v.passed else 0


def _write_json(path: str | None, summary: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(summary, indent=2, default=str) + "\n")
