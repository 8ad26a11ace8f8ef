"""What every test package shares: the repository root, the brokers, waiting on a condition."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BROKERS = {
    "redis": "redis://127.0.0.1:6379/9",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
}
WORKER_FLAGS = ["--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
