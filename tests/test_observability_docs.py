"""docs/observability.md, config/ballast-alerts.yml and docs/grafana-dashboard.json name
only metrics (and labels, and label values) that Ballast exports, and all of them.

Metric names in PromQL are found by pattern (``ballast_...``); a histogram's ``_bucket``,
``_sum`` and ``_count`` series belong to it. Where ``promtool`` is installed (Debian's
``prometheus`` package), the rules are also checked by it, the dashboard's queries are
parsed by it, and the alerts are unit-tested on synthetic series.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ballast.sessions.finalize import STAGES
from ballast.telemetry import METRICS, Reason

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "observability.md"
ALERTS = ROOT / "config" / "ballast-alerts.yml"
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"

HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
METRIC_REF = re.compile(r"\bballast_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b(ballast_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"(\w+)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")

#: Values a label may take, where the set is closed.
OUTCOMES = {"ok", *(str(r) for r in Reason)}
KNOWN_VALUES: dict[str, set[str]] = {
    "outcome": OUTCOMES | {"succeeded", "failed", "timed_out"},
    "reason": {str(r) for r in Reason},
    "state": {"open", "half_open", "closed"},
    "stage": set(STAGES),
}


def _base(series: str) -> tuple[str, bool]:
    """The catalogue name a series belongs to, and whether it is a histogram bucket."""
    if series in METRICS:
        return series, False
    for suffix in HISTOGRAM_SERIES:
        base = series.removesuffix(suffix)
        if base != series and base in METRICS and METRICS[base].type == "histogram":
            return base, suffix == "_bucket"
    raise AssertionError(f"{series}: not a metric Ballast exports (ballast.telemetry.METRICS)")


def check_expr(expr: str, where: str) -> set[str]:
    """Assert ``expr`` uses only exported metrics, labels and values; return the metrics."""
    used: set[str] = set()
    labels: set[str] = set()
    for series in METRIC_REF.findall(expr):
        base, bucket = _base(series)
        used.add(base)
        labels |= set(METRICS[base].labels) | ({"le"} if bucket else set())
    assert used, f"{where}: no Ballast metric in {expr!r}"
    for series, body in SELECTOR.findall(expr):
        base, bucket = _base(series)
        allowed = set(METRICS[base].labels) | ({"le"} if bucket else set())
        for label, op, value in MATCHER.findall(body):
            assert label in allowed, f"{where}: {series} has no label {label!r} (has {sorted(allowed)})"
            if label in KNOWN_VALUES and op in ("=", "!="):
                assert value in KNOWN_VALUES[label], f"{where}: {label}={value!r} never occurs"
            if label in KNOWN_VALUES and op in ("=~", "!~"):
                for alternative in value.split("|"):
                    assert alternative in KNOWN_VALUES[label], \
                        f"{where}: {label}=~{alternative!r} never occurs"
    for group in GROUPING.findall(expr):
        for label in (x.strip() for x in group.split(",") if x.strip()):
            assert label in labels, f"{where}: groups by {label!r}, which no metric in it has"
    return used


# ------------------------------------------------------------------------------ the doc


def _doc_rows() -> dict[str, tuple[str, tuple[str, ...]]]:
    rows = re.findall(r"^\| `(ballast_\w+)` \| (counter|gauge|histogram) \|([^|]*)\|", DOC.read_text(),
                      re.MULTILINE)
    table: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name, type_, labels in rows:
        assert name not in table, f"{name} documented twice"
        table[name] = (type_, tuple(re.findall(r"`(\w+)`", labels)))
    return table


def test_the_doc_lists_every_metric_with_its_type_and_labels() -> None:
    table = _doc_rows()
    assert set(table) == set(METRICS), "docs/observability.md and ballast.telemetry.METRICS differ"
    for name, spec in METRICS.items():
        assert table[name] == (spec.type, spec.labels), name


def test_the_doc_names_only_exported_metrics_anywhere() -> None:
    for series in set(METRIC_REF.findall(DOC.read_text())):
        _base(series)


def test_the_docs_promql_examples_use_exported_metrics_and_labels() -> None:
    blocks = re.findall(r"```promql\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert blocks
    for line in (line for block in blocks for line in block.splitlines()):
        if line.strip() and not line.startswith("#"):
            check_expr(line, "docs/observability.md")


# ------------------------------------------------------------------------------ alert rules


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    assert rules
    return rules


def test_alert_rules_use_only_exported_metrics_labels_and_values() -> None:
    for rule in _rules():
        check_expr(rule["expr"], f"alert {rule['alert']}")


def test_alert_rules_are_complete_and_documented() -> None:
    rules = {rule["alert"]: rule for rule in _rules()}
    documented = set(re.findall(r"^\| `(Ballast\w+)` \|", DOC.read_text(), re.MULTILINE))
    assert documented == set(rules)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    # What the issue asks to be alerted on.
    assert "ballast_circuit_state" in rules["BallastCircuitOpen"]["expr"]
    assert rules["BallastCircuitOpen"]["for"] == "5m"
    assert 'reason="budget_exhausted"' in rules["BallastRetryBudgetExhausted"]["expr"]
    assert "ballast_load_shed_total" in rules["BallastLoadShedding"]["expr"]
    assert 'outcome="timed_out"' in rules["BallastFinalizeTimeouts"]["expr"]


# ------------------------------------------------------------------------------ dashboard


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def _targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(panel["title"], target) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_the_dashboard_shows_every_exported_metric_and_nothing_else() -> None:
    used: set[str] = set()
    for title, target in _targets(_dashboard()):
        metrics = check_expr(target["expr"], f"panel {title!r}")
        used |= metrics
        labels = {label for name in metrics for label in METRICS[name].labels}
        for label in LEGEND_LABEL.findall(target.get("legendFormat", "")):
            assert label in labels, f"panel {title!r}: legend names {label!r}, not a label of {metrics}"
    assert used == set(METRICS), f"not on the dashboard: {sorted(set(METRICS) - used)}"


def test_the_dashboard_covers_the_request_path_the_upstream_path_and_finalize() -> None:
    dashboard = _dashboard()
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Request path", "Upstream path", "Finalize and storage"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]


def test_the_checker_refuses_what_does_not_exist() -> None:
    """The checks above can fail: unknown metrics, labels and values are refused."""
    with pytest.raises(AssertionError, match="not a metric"):
        check_expr("rate(ballast_no_such_thing_total[5m])", "t")
    with pytest.raises(AssertionError, match="no label"):
        check_expr('ballast_circuit_state{route="x"}', "t")
    with pytest.raises(AssertionError, match="never occurs"):
        check_expr('ballast_finalize_jobs_total{outcome="exploded"}', "t")
    with pytest.raises(AssertionError, match="groups by"):
        check_expr("sum by (tenant) (ballast_executor_in_use)", "t")
    assert check_expr('histogram_quantile(0.9, sum by (le, stage) '
                      '(rate(ballast_finalize_stage_duration_seconds_bucket{stage="report"}[5m])))',
                      "t") == {"ballast_finalize_stage_duration_seconds"}


# ------------------------------------------------------------------------------ promtool

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None,
                                    reason="promtool (Debian package prometheus) not installed")


@needs_promtool
def test_promtool_accepts_the_rules_and_the_dashboard_queries(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # Each dashboard query as a recording rule, so promtool parses it.
    records = [{"record": f"ballast:panel_{i}", "expr": target["expr"].replace("$__rate_interval", "5m")}
               for i, (_, target) in enumerate(_targets(_dashboard()))]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


#: Synthetic series (promtool's expanding notation) that should set off the alerts.
SERIES = {
    'ballast_circuit_state{upstream="openai"}': "0 0 2x10",
    'ballast_upstream_retries_denied_total{upstream="openai",reason="budget_exhausted"}': "0+5x15",
    'ballast_finalize_jobs_total{outcome="timed_out"}': "0 0 1 1 1 1",
    'ballast_finalize_jobs_total{outcome="succeeded"}': "0+10x15",
    'ballast_load_shed_total{route="/v1/sessions/{session_id}"}': "0+30x15",
    'ballast_http_requests_total{method="GET",route="/v1/sessions/{session_id}",status="200"}': "0+100x15",
}
#: (alert, minute, labels of the one alert expected then, or None for no alert).
EXPECTED: list[tuple[str, int, dict[str, str] | None]] = [
    ("BallastCircuitOpen", 4, None),  # open for 2 minutes: not yet
    ("BallastCircuitOpen", 9, {"upstream": "openai"}),
    ("BallastRetryBudgetExhausted", 10, {"upstream": "openai"}),
    ("BallastFinalizeTimeouts", 5, {}),
    ("BallastLoadShedding", 14, {}),
    ("BallastHighErrorRate", 14, None),
    ("BallastUpstreamFailing", 14, None),
]


def _alert_tests() -> dict[str, Any]:
    rules = {rule["alert"]: rule for rule in _rules()}

    def render(text: str, labels: dict[str, str]) -> str:
        return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)

    cases = []
    for alert, minute, labels in EXPECTED:
        expected = []
        if labels is not None:
            rule = rules[alert]
            expected.append({
                "exp_labels": {"severity": rule["labels"]["severity"], **labels},
                "exp_annotations": {k: render(v, labels) for k, v in rule["annotations"].items()}})
        cases.append({"eval_time": f"{minute}m", "alertname": alert, "exp_alerts": expected})
    return {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": k, "values": v} for k, v in SERIES.items()],
        "alert_rule_test": cases}]}


@needs_promtool
def test_promtool_fires_the_alerts_on_synthetic_series(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    path = tmp_path / "alerts-test.yml"
    path.write_text(yaml.safe_dump(_alert_tests()))
    result = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
