"""The Prometheus rules and Grafana dashboard in monitoring/.

The rules are checked and unit-tested with the real ``promtool`` (the
``prometheus`` Debian package); these tests fail, never skip, without it.
Dashboard expressions are checked against the metric names of the contract
and parsed by promtool too.  PyYAML is not a dependency, so the YAML files are
read with a few line-based helpers that rely on their layout (one
``- alert:`` per rule, one ``alertname:`` per test case).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
ALERTS = MONITORING / "prometheus" / "alerts.yml"
ALERTS_TEST = MONITORING / "prometheus" / "alerts_test.yml"
DASHBOARD = MONITORING / "grafana" / "celery-bulkhead.json"

# Series names (as Prometheus stores them) -> the labels they carry (besides the
# instance/job labels added by the scrape).
_HISTOGRAM = ("_bucket", "_sum", "_count")
METRICS: dict[str, set[str]] = {
    "celery_bulkhead_queue_depth": {"pool"},
    "celery_bulkhead_queue_cap": {"pool"},
    "celery_bulkhead_inflight": {"pool"},
    "celery_bulkhead_concurrency": {"pool"},
    "celery_bulkhead_consumers": {"pool"},
    **{
        f"celery_bulkhead_{histogram}{suffix}": {"pool", "le"} if suffix == "_bucket" else {"pool"}
        for histogram in ("task_duration_seconds", "queue_wait_seconds")
        for suffix in _HISTOGRAM
    },
    "celery_bulkhead_tasks_total": {"pool", "outcome"},
    "celery_bulkhead_admissions_total": {"pool", "decision", "reason"},
    "celery_bulkhead_breaker_state": {"breaker"},
    "celery_bulkhead_breaker_transitions_total": {"breaker", "state"},
    "celery_bulkhead_tenant_throttled_total": {"pool", "side"},
}
SCRAPE_LABELS = {"instance", "job"}

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}


# -- helpers ----------------------------------------------------------------------------


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: apt-get install prometheus (or put Prometheus's "
            "promtool on PATH)"
        )
    return path


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (not functions, labels or keywords)."""
    text = _strip_strings(expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )  # grouping label lists
    names = set()
    for match in re.finditer(r"(?<![\w$.:])[A-Za-z_:][\w:]*", text):
        name = match.group(0)
        if name.lower() in _KEYWORDS or re.match(r"\s*\(", text[match.end() :]):
            continue  # keyword or function call
        names.add(name)
    return names


def matcher_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names in its {...} matchers) for every selector with matchers."""
    found = []
    # Strings such as "rejected|dropped" are blanked; the label names before them stay.
    for match in re.finditer(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", _strip_strings(expr)):
        labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", match.group(2)))
        found.append((match.group(1), labels))
    return found


def _check_expr(expr: str, where: str) -> None:
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    unknown = names - METRICS.keys()
    assert not unknown, f"{where}: {sorted(unknown)} are not celery-bulkhead metrics: {expr!r}"
    for metric, labels in matcher_labels(expr):
        extra = labels - METRICS[metric] - SCRAPE_LABELS
        assert not extra, f"{where}: {metric} has no label {sorted(extra)}: {expr!r}"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def alert_rules() -> dict[str, dict[str, str]]:
    """alert name -> {"expr", "for", "severity", "summary", "description", "text"}."""
    lines = ALERTS.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"\s*- alert:", line)]
    rules: dict[str, dict[str, str]] = {}
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        block = lines[start:end]
        name = block[0].split("alert:", 1)[1].strip()
        assert name not in rules, f"alert {name} defined twice"
        rule = {"text": "\n".join(block)}
        for key in ("expr", "for", "severity", "summary", "description"):
            rule[key] = _yaml_value(block, key)
        rules[name] = rule
    return rules


def _yaml_value(block: list[str], key: str) -> str:
    """The value of ``key:`` in a block: inline (quotes removed) or a |/>- block scalar."""
    for i, line in enumerate(block):
        match = re.match(rf"(\s*){key}:\s*(.*)$", line)
        if not match:
            continue
        value = match.group(2).strip()
        if value in ("|", "|-", ">", ">-"):
            body = []
            for following in block[i + 1 :]:
                if following.strip() and _indent(following) <= len(match.group(1)):
                    break
                body.append(following.strip())
            return (" " if value.startswith(">") else "\n").join(body).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        return value
    return ""


def alert_test_cases() -> list[tuple[str, bool]]:
    """(alertname, fires) for every alert_rule_test case of alerts_test.yml."""
    lines = ALERTS_TEST.read_text().splitlines()
    cases = []
    for i, line in enumerate(lines):
        match = re.match(r"\s*alertname:\s*(\S+)", line)
        if not match:
            continue
        for following in lines[i + 1 :]:
            exp = re.match(r"\s*exp_alerts:\s*(.*)$", following)
            if exp:
                cases.append((match.group(1), exp.group(1).strip() != "[]"))
                break
            assert not re.match(r"\s*(?:-\s*)?(?:alertname|eval_time):", following), (
                f"test case for {match.group(1)} (line {i + 1}) has no exp_alerts"
            )
    return cases


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return found


def dashboard_exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (f"panel {panel['title']!r} target {target['refId']}", target["expr"])
        for panel in panels(board)
        for target in panel.get("targets", [])
    ]


# -- promtool ---------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    result = _run("check", "rules", ALERTS)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"SUCCESS: (\d+) rules found", result.stdout)
    assert found, result.stdout
    # The line-based reader below sees the same rules as promtool.
    assert int(found.group(1)) == len(alert_rules())


def test_promtool_test_rules() -> None:
    # Run from the file's directory, as its rule_files path is relative.
    result = subprocess.run(
        [_promtool(), "test", "rules", ALERTS_TEST.name],
        cwd=ALERTS_TEST.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_dashboard_exprs_parse(tmp_path: Path) -> None:
    """Every dashboard query is valid PromQL (Grafana variables filled in)."""
    rules = []
    for n, (_, expr) in enumerate(dashboard_exprs(dashboard())):
        promql = (
            expr.replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$pool", ".+")
        )
        assert "$" not in promql, f"unknown Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:expr_{n}", "expr": promql})
    path = tmp_path / "dashboard_rules.yml"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


# -- alerts.yml and alerts_test.yml -----------------------------------------------------


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    assert {
        "BulkheadQueueNearCap",
        "BulkheadAdmissionsRefused",
        "BulkheadBreakerOpen",
        "BulkheadQueueWaitAboveSLO",
        "BulkheadPoolWithoutConsumers",
        "BulkheadHighFailureRate",
    } <= rules.keys()
    for name, rule in rules.items():
        _check_expr(rule["expr"], f"alert {name}")
        assert rule["for"], f"alert {name} has no for:"
        assert rule["severity"] in {"warning", "critical"}, f"alert {name}: severity"
        # Breakers are not per pool; everything else names its pool.
        label = "pool" if "pool" in rule["expr"] else "breaker"
        for key in ("summary", "description"):
            assert f"{{{{ $labels.{label} }}}}" in rule[key], f"alert {name}: {key}"


def test_every_alert_fires_and_stays_quiet_in_a_test() -> None:
    rules = alert_rules().keys()
    cases = alert_test_cases()
    tested = {name for name, _ in cases}
    assert not tested - rules, f"tests for unknown alerts: {sorted(tested - rules)}"
    for name in rules:
        fires = [fired for alert, fired in cases if alert == name]
        assert True in fires, f"no test case where {name} fires"
        assert False in fires, f"no test case where {name} does not fire"


def test_queue_wait_slo_is_consistent() -> None:
    """The SLO number appears in several places (see monitoring/README.md)."""
    rule = alert_rules()["BulkheadQueueWaitAboveSLO"]
    threshold = re.search(r"\)\s*>\s*([\d.]+)\s*$", rule["expr"])
    assert threshold, rule["expr"]
    slo = threshold.group(1)
    assert f"slo: queue_wait_p95_{slo}s" in rule["text"]
    assert f"{slo} s" in rule["summary"]
    assert f"{slo} s" in rule["description"]
    assert f"above the {slo} s SLO" in ALERTS_TEST.read_text()
    assert f"QUEUE_WAIT_SLO_SECONDS = {slo}" in ALERTS.read_text()
    assert f"QUEUE_WAIT_SLO_SECONDS = {slo}" in (MONITORING / "README.md").read_text()
    [panel] = [p for p in panels(dashboard()) if p["title"].startswith("Queue wait p95")]
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert float(slo) in [step["value"] for step in steps]


# -- the dashboard ----------------------------------------------------------------------


def test_dashboard_metric_names() -> None:
    exprs = dashboard_exprs(dashboard())
    assert exprs
    for where, expr in exprs:
        _check_expr(expr, where)
    used = set().union(*(metric_names(expr) for _, expr in exprs))
    # Every contract metric has a panel (histograms through their buckets).
    expected = {m for m in METRICS if not m.endswith(("_sum", "_count"))}
    assert expected <= used, sorted(expected - used)


def test_dashboard_structure() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    assert board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    pool = variables["pool"]
    assert pool["type"] == "query"
    assert pool["definition"] == "label_values(celery_bulkhead_queue_depth, pool)"
    assert pool["query"]["query"] == pool["definition"]
    assert pool["datasource"]["uid"] == "${datasource}"

    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert any(p["type"] == "row" and p.get("repeat") == "pool" for p in board["panels"])
    for panel in panels(board):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            # Per-pool panels follow the pool variable; breakers have no pool label.
            if "breaker" not in target["expr"]:
                assert 'pool=~"$pool"' in target["expr"], (panel["title"], target["expr"])


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("sum by (pool) (rate(celery_bulkhead_tasks_total[5m]))", {"celery_bulkhead_tasks_total"}),
        (
            'histogram_quantile(0.95, sum by (pool, le) (rate(a_bucket{pool=~"$pool"}'
            "[$__rate_interval]))) > 30",
            {"a_bucket"},
        ),
        ("a / on (pool) group_left() b unless c offset 5m", {"a", "b", "c"}),
        ('max by (breaker) (x{state="open"}) == bool 2 and y', {"x", "y"}),
    ],
)
def test_metric_names_helper(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
