"""``celery bulkhead size``: Little's law on the command line, from flags or a worker's metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from celery.bin.base import CLIContext
from click.testing import CliRunner

from celery_bulkhead.cli import bulkhead
from tests.app import shop
from tests.e2e.conftest import Env
from tests.e2e.test_metrics import free_base_port, start_metered
from tests.support import ROOT
from tests.unit.test_sizing import exposition


def size(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.app.shop", "bulkhead", "size", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env or {"PATH": "/usr/bin:/bin", "BULKHEAD_TEST_PREFIX": "cli"},
    )


def test_the_seeds_worked_example_step_by_step() -> None:
    result = size("--rate", "5000/s", "--p99", "80ms", "--instances", "4", "--headroom", "20%")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[2:6] == [
        "1. busy workers: L = 5,000/s * 0.08 s = 400",
        "2. headroom 20 %: N = L * 1.2 = 480",
        "3. per instance: 480 / 4 = 120, rounded up: 120",
        "=> concurrency 120 per instance (4 * 120 = 480 workers)",
    ]
    assert len(lines) <= 24


def test_over_the_downstream_limit_it_caps_and_says_the_queue_grows() -> None:
    result = size("--rate", "200/s", "--latency", "0.5", "--downstream", "50")
    assert result.returncode == 0, result.stderr
    assert "143 > 50: capped at 50" in result.stdout
    assert "=> concurrency 50 per instance" in result.stdout
    assert "the queue grows by 100 tasks/s (200/s arrive, 100/s are served)" in result.stdout
    assert "max_queue and an on_full policy" in result.stdout


def test_json_output_carries_every_number() -> None:
    result = size("--rate", "600/m", "--latency", "0.5", "--p99", "1.2", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["workload"]["rate"] == 10.0
    assert data["planning_latency"] == 1.2
    assert data["per_instance"] == 18  # 10 * 1.2 / 0.7 = 17.1
    assert data["observed"] is None and data["pool"] is None


def test_pool_comparison_and_a_max_queue_from_the_max_wait() -> None:
    """Pool 'metered' of tests/app/shop.py: concurrency 4, max_queue 1000."""
    result = size(
        "--rate", "20/s", "--latency", "1", "--instances", "2", "--max-wait", "30", "-p", "metered"
    )
    assert result.returncode == 0, result.stderr
    assert "max_queue = drain rate * max wait = 20/s * 30 s = 600" in result.stdout
    assert (
        "pool 'metered': concurrency 4 * 2 instance(s) = 8 workers; recommended 15 * 2 = 30"
    ) in result.stdout
    assert "raise the pool's concurrency from 4 to 15" in result.stdout
    assert "max_queue: configured 1,000, suggested 600" in result.stdout


#: (arguments, what stderr says): each names the option, the value and what is allowed.
BAD_INPUTS: list[tuple[list[str], str]] = [
    (["--rate", "fast", "--latency", "1"], "Invalid value for '--rate': 'fast' is not allowed"),
    (["--rate", "5/d", "--latency", "1"], "'5/d' is not allowed; allowed: a rate such as"),
    (["--rate", "1/s", "--latency", "-2"], "Invalid value for '--latency': '-2' is not"),
    (["--rate", "1/s", "--p99", "x"], "Invalid value for '--p99': 'x' is not allowed"),
    (["--rate", "1/s", "--latency", "1", "--downstream", "0"], "'--downstream': '0'"),
    (["--rate", "1/s", "--latency", "1", "--instances", "two"], "'--instances': 'two'"),
    (["--rate", "1/s", "--latency", "1", "--utilization", "0"], "'--utilization': '0'"),
    (["--rate", "1/s", "--latency", "1", "--headroom", "-5%"], "'--headroom': '-5%'"),
    (["--rate", "1/s", "--latency", "1", "--max-wait", "0"], "'--max-wait': '0'"),
    (["--rate", "1/s", "--latency", "1", "--window", "0"], "'--window': '0'"),
    (
        ["--rate", "1/s", "--latency", "1", "--downstream", "2", "--instances", "3"],
        "--downstream: 2 is not allowed; allowed: at least one call per instance",
    ),
    (
        ["--rate", "1/s", "--latency", "1", "--headroom", "0.2", "--utilization", "0.5"],
        "--headroom: 0.2 is not allowed; allowed: no headroom when a utilization is given",
    ),
    (["--latency", "1"], "Missing option --rate"),
    (["--rate", "1/s"], "Missing option --latency (or --p99)"),
    (["--rate", "1/s", "--latency", "1", "-p", "nope"], "invalid pool='nope'; allowed: one of"),
    (
        ["--from", "127.0.0.1:9"],
        "'127.0.0.1:9' is not allowed; allowed: an http:// or https://",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS)
def test_every_bad_input_is_a_usage_error_naming_the_option(args: list[str], message: str) -> None:
    """In process, the command as ``celery -A tests.app.shop`` calls it (no interpreter start)."""
    context = CLIContext(app=shop.app, no_color=True, workdir=None)
    result = CliRunner().invoke(bulkhead, ["size", *args], obj=context)
    assert result.exit_code == 2, result.output
    assert message in result.output  # stdout and stderr, on every supported click
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_bad_input_from_the_real_command_line() -> None:
    result = size("--rate", "1/s", "--latency", "1", "--downstream", "-3")
    assert result.returncode == 2
    assert (
        "Error: Invalid value for '--downstream': '-3' is not allowed; "
        "allowed: a whole number from 1 to 10,000,000\n"
    ) in result.stderr


# -- --from: a canned worker /metrics page ---------------------------------------------


class Pages:
    """A tiny /metrics server: answers the n-th request with the n-th page (the last one after)."""

    def __init__(self, *pages: str) -> None:
        self.pages = list(pages)
        self.served = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                page = outer.pages[min(outer.served, len(outer.pages) - 1)].encode()
                outer.served += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served() -> Iterator[type[Pages]]:
    opened: list[Pages] = []

    class Opened(Pages):
        def __init__(self, *pages: str) -> None:
            super().__init__(*pages)
            opened.append(self)

    yield Opened
    for pages in opened:
        pages.close()


def test_from_sizes_by_the_observed_rate_and_latency(served: type[Pages]) -> None:
    """100 tasks finish in the 1 s window, p99 0.106 s: L = 10.6 -> 11 at 100 % utilisation."""
    buckets = {"0.1": 0, "0.107": 100, "+Inf": 100}
    before = exposition("io", finished=100, total=10.5, buckets=buckets)
    after = exposition(
        "io", finished=200, total=21.0, buckets={k: 2 * n for k, n in buckets.items()}
    )
    pages = served(before, after)
    result = size("--from", pages.url, "--window", "1", "--utilization", "1", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    seen = data["observed"]
    assert seen["pool"] == "io" and seen["finished"] == 100 and seen["samples"] == 100
    assert seen["rate"] == pytest.approx(100 / seen["window"])
    assert 1.0 <= seen["window"] < 1.5
    assert seen["latency"] == pytest.approx(0.105)
    assert seen["p99"] == pytest.approx(0.1 + 0.007 * 0.99)  # the window's buckets
    assert data["workload"]["latency"] == pytest.approx(0.105)
    assert data["per_instance"] == 11
    assert pages.served == 2


def test_from_explains_what_it_observed_and_compares_with_the_node(served: type[Pages]) -> None:
    before = exposition("io", finished=10, total=5.0, buckets={"0.5": 10, "1.0": 10, "+Inf": 10})
    after = exposition("io", finished=30, total=15.0, buckets={"0.5": 30, "1.0": 30, "+Inf": 30})
    result = size("--from", served(before, after).url, "--window", "0.5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("observed pool 'io' at http://127.0.0.1:")
    assert "20 tasks finished" in lines[0]
    assert "latency mean 0.5 s, p99 0.495 s (from 20 tasks in the window)" in lines[1]
    assert any(line.startswith("pool 'io': concurrency 4 * 1 instance(s)") for line in lines)


def test_flags_given_with_from_override_what_was_observed(served: type[Pages]) -> None:
    before = exposition("io", finished=10, total=5.0, buckets={"0.5": 10, "+Inf": 10})
    after = exposition("io", finished=30, total=15.0, buckets={"0.5": 30, "+Inf": 30})
    url = served(before, after).url
    result = size("--from", url, "--window", "0.2", "--rate", "7/s", "--utilization", "1", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["per_instance"] == 4  # 7/s * the observed 0.5 s = 3.5
    url = served(before, after).url  # a fresh pair of pages
    result = size("--from", url, "--window", "0.2", "--p99", "2", "--utilization", "1", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["workload"]["latency"] == pytest.approx(0.5)  # observed, kept
    assert data["planning_latency"] == 2.0  # given, wins over the observed p99


def test_from_an_unreachable_url_is_a_clear_error() -> None:
    result = size("--from", "http://127.0.0.1:9/metrics", "--window", "0.1")
    assert result.returncode == 2
    assert "Invalid value for --from: 'http://127.0.0.1:9/metrics' cannot be read:" in result.stderr
    assert "Traceback" not in result.stderr


def test_from_a_page_without_bulkhead_metrics_is_a_clear_error(served: type[Pages]) -> None:
    url = served("# TYPE up gauge\nup 1\n").url
    result = size("--from", url, "--window", "0.1")
    assert result.returncode == 2
    assert f"'{url}': no celery-bulkhead pool metrics" in result.stderr


def test_from_a_pool_with_no_arrivals_says_there_is_nothing_to_size(served: type[Pages]) -> None:
    page = exposition("io", finished=5, total=1.0, buckets={"0.5": 5, "+Inf": 5})
    result = size("--from", served(page).url, "--window", "0.1")
    assert result.returncode == 2
    assert "no task arrived at pool 'io'" in result.stderr
    assert "give --rate" in result.stderr


def test_from_a_real_pool_worker(redis_shop: Env) -> None:
    """A metered worker under a steady trickle of tasks: its metrics size the pool."""
    env = redis_shop
    port = start_metered(env, free_base_port())
    task = env.app.tasks["shop.metered"]
    stop = threading.Event()

    def trickle() -> None:
        i = 0
        while not stop.is_set():
            task.delay(f"trickle-{i}")
            i += 1
            time.sleep(0.05)

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        env.records.wait("done", "trickle-0", timeout=60)
        result = size(
            "--from",
            f"http://127.0.0.1:{port}/metrics",
            "--window",
            "2",
            "-p",
            "metered",
            "--json",
            env={
                **os.environ,
                "BULKHEAD_TEST_BROKER": env.url,
                "BULKHEAD_TEST_PREFIX": env.prefix,
            },
        )
    finally:
        stop.set()
        feeder.join(timeout=10)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    seen = data["observed"]
    assert seen["pool"] == "metered"
    assert 5 < seen["rate"] < 40  # ~20/s sent
    assert seen["latency"] is not None and 0 < seen["latency"] < 1
    assert data["per_instance"] >= 1
    assert data["pool"] == {"name": "metered", "concurrency": 4, "max_queue": 1000}
