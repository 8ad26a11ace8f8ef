"""``python -m celery_bulkhead.demo``: the one command a newcomer runs, end to end.

Each test runs the real demo in a subprocess, with real worker processes, in
``--quick --check`` mode, and reads the ``--json`` summary it writes: the
numbers are the ones the demo measured.  Once against CI's Redis (a database
of its own, which must be empty again afterwards), once with no
``redis-server`` on ``PATH`` and no broker given (the embedded fallback), once
interrupted with Ctrl-C.  Every process the demo reports having started or
seen must be gone, and its temporary directory removed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support import ROOT

#: CI's Redis, in a database no other test uses: the demo must leave it empty.
DEMO_DB_URL = "redis://127.0.0.1:6379/13"


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _environ(**changes: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_BROKER")}
    env["PYTHONPATH"] = str(ROOT)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _demo(
    tmp_path: Path, *args: str, env: dict[str, str], timeout: float = 150.0
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    summary = tmp_path / "summary.json"
    command = [
        sys.executable,
        "-m",
        "celery_bulkhead.demo",
        "--quick",
        "--check",
        "--output",
        str(tmp_path / "out"),
        "--json",
        str(summary),
        *args,
    ]
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    sys.stdout.write(result.stdout[-6000:])
    sys.stderr.write(result.stderr[-6000:])
    return result, json.loads(summary.read_text())


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None if there is none."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _running(pid: int, start: str | None) -> bool:
    """Alive, not a zombie, and the same process (same start time) as the demo saw."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and (start is None or fields[19] == start)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def _assert_left_nothing(summary: dict[str, Any], expected_labels: set[str]) -> None:
    processes = summary["processes"]
    labels = {p["label"] for p in processes}
    assert expected_labels <= labels, labels
    deadline = time.monotonic() + 5  # init may take a moment to reap an orphan
    while True:
        running = [p for p in processes if _running(p["pid"], p["start"])]
        groups = {p["pgid"]: _group_members(p["pgid"]) for p in processes if p["pgid"]}
        groups = {g: members for g, members in groups.items() if members}
        if not running and not groups:
            break
        assert time.monotonic() < deadline, f"still running: {running}, groups: {groups}"
        time.sleep(0.1)
    assert not Path(summary["temp_dir"]).exists(), "the temporary directory was not removed"


def _assert_measured(summary: dict[str, Any], tmp_path: Path) -> None:
    check = summary["check"]
    assert check["passed"], check["reasons"]
    plain = summary["runs"]["plain"]["pools"]
    bulkhead = summary["runs"]["bulkhead"]["pools"]
    # The headline: the same payments stream, far faster at p99 beside a hung API.
    assert bulkhead["payments"]["p99"] < 0.2 * plain["payments"]["p99"]
    assert bulkhead["payments"]["completed"] == bulkhead["payments"]["sent"] > 0
    assert plain["payments"]["completed"] == plain["payments"]["sent"]
    # Caps held: never more ready messages than the cap, as the broker counted them.
    for name, pool in bulkhead.items():
        assert pool["cap"] is not None, name
        assert pool["max_depth"] is not None and pool["max_depth"] <= pool["cap"], (name, pool)
    # The mechanisms did their part, and the table says so with numbers from the run.
    assert bulkhead["reports"]["throttled"] > 0  # bigcorp's flood, refused at submit
    assert bulkhead["webhooks"]["breaker"].get("open", 0) >= 1
    assert bulkhead["webhooks"]["breaker"].get("closed", 0) >= 1  # and recovered
    assert plain["webhooks"]["rejected"] is None  # plain Celery has no such thing
    chart = Path(summary["chart"])
    assert chart.parent == (tmp_path / "out").resolve()
    data = chart.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000


@pytest.fixture
def demo_db() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(DEMO_DB_URL)
    client.flushdb()  # this database is the demo tests' own
    yield client
    client.flushdb()
    client.close()


def test_on_ci_redis_the_bulkheads_keep_payments_fast_and_leave_nothing_behind(
    tmp_path: Path, demo_db: redis.Redis
) -> None:
    result, summary = _demo(tmp_path, "--broker", DEMO_DB_URL, env=_environ())
    assert result.returncode == 0, result.stderr
    assert summary["broker"]["kind"] == "url"
    _assert_measured(summary, tmp_path)
    _assert_left_nothing(summary, {"plain worker", "bulkhead worker"})
    assert demo_db.dbsize() == 0, sorted(demo_db.scan_iter(count=100))[:20]
    assert "Verdict: with bulkheads, payments stayed fast" in result.stdout


def test_without_redis_server_on_path_it_runs_on_the_embedded_server(tmp_path: Path) -> None:
    path = os.pathsep.join(
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and not (Path(d) / "redis-server").exists()
    )
    assert shutil.which("redis-server", path=path) is None
    result, summary = _demo(tmp_path, env=_environ(PATH=path))
    assert result.returncode == 0, result.stderr
    assert summary["broker"]["kind"] == "embedded"
    assert "embedded" in result.stdout
    _assert_measured(summary, tmp_path)
    _assert_left_nothing(summary, {"embedded-redis", "plain worker", "bulkhead worker"})


def test_ctrl_c_stops_every_process_and_removes_the_temporary_files(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "celery_bulkhead.demo", "--quick", "--json", str(summary_path)],
        cwd=tmp_path,
        env=_environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    try:
        seen = []
        for line in process.stdout:  # interrupt in the middle of run A, workers running
            seen.append(line)
            if line.startswith("A  plain Celery"):
                break
        else:
            pytest.fail("the demo ended before run A:\n" + "".join(seen))
        time.sleep(1.5)
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, "".join(seen) + rest
    assert "interrupted" in rest
    summary = json.loads(summary_path.read_text())
    assert summary["error"] == "interrupted"
    _assert_left_nothing(summary, {"plain worker", "bulkhead worker"})


def test_without_the_demo_extra_it_names_the_extra(tmp_path: Path) -> None:
    """No matplotlib: one line naming the extra, exit 2, before anything starts."""
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import celery_bulkhead.demo.report, celery_bulkhead.demo.cli as cli\n"
        "sys.exit(cli.main(['--quick']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_environ(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pip install 'celery-bulkhead[demo]'" in result.stderr
    assert "matplotlib" in result.stderr
    assert result.stdout == ""  # nothing ran


def test_importing_the_demo_imports_no_plotting_library() -> None:
    code = (
        "import sys, celery_bulkhead.demo.cli, celery_bulkhead.demo.report, "
        "celery_bulkhead.demo.run\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
        "assert 'fakeredis' not in sys.modules, 'fakeredis imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=_environ(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_the_verdict_says_so_when_the_bulkheads_did_not_keep_payments_fast() -> None:
    """Claims are measured: a bulkhead p99 not far below plain Celery's fails the check."""
    from celery_bulkhead.demo.report import PoolStats, verdict

    def stats(p99: float, depth: int, cap: int | None) -> dict[str, PoolStats]:
        return {
            pool: PoolStats(pool, 10, 10, 0, 0, p99, p99, p99, 0, 0, 0, 0, depth, cap, cap is None)
            for pool in ("payments", "webhooks", "reports")
        }

    good = verdict(stats(2.0, 5, None), stats(0.03, 5, 10))
    assert good.passed and good.caps_held and good.ratio == pytest.approx(0.015)
    slow = verdict(stats(2.0, 5, None), stats(0.9, 5, 10))
    assert not slow.passed
    assert "not far below" in slow.reasons[0]
    over = verdict(stats(2.0, 5, None), stats(0.03, 11, 10))
    assert not over.passed and not over.caps_held
    assert "over its cap of 10" in over.reasons[0]
