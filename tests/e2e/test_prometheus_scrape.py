"""A real Prometheus server scrapes a pool worker's endpoint."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

from tests.e2e.conftest import Env, wait_for
from tests.e2e.test_metrics import free_base_port, start_metered


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return list(json.load(response)["data"]["result"])
    except OSError:
        return []


def test_prometheus_scrapes_the_pool_metrics(redis_shop: Env, tmp_path: Path) -> None:
    env = redis_shop
    metrics_port = start_metered(env, free_base_port())
    for i in range(5):
        env.app.tasks["shop.metered"].delay(f"scraped-{i}")
    for i in range(5):
        env.records.wait("done", f"scraped-{i}", timeout=60)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: bulkhead\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    port = _free_port()
    binary = shutil.which("prometheus")
    assert binary, "the Debian package prometheus must be installed (CI installs it)"
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        series = wait_for(
            lambda: _query(port, 'celery_bulkhead_tasks_total{pool="metered",outcome="succeeded"}'),
            60,
            "Prometheus to scrape the worker",
        )
        assert float(series[0]["value"][1]) == 5
        (up,) = _query(port, 'up{job="bulkhead"}')
        assert up["value"][1] == "1"
    finally:
        server.terminate()
        server.wait(timeout=30)
