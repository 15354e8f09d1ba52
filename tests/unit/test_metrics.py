"""Metrics: the collector's families, the /metrics app, OpenTelemetry, alert rules, dashboard.

The collector reads a real in-memory manager driven with a FakeClock. The alert rules are run by
Prometheus's own `promtool` (check and unit tests), and every dashboard query is parsed by it.
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

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "gateway-breaker.json"
METRIC_NAMES = {
    "gateway_breaker_state",
    "gateway_breaker_calls_total",
    "gateway_breaker_transitions_total",
    "gateway_breaker_failure_rate",
    "gateway_breaker_window_calls",
    "gateway_breaker_window_failures",
    "gateway_breaker_consecutive_failures",
    "gateway_breaker_retry_after_seconds",
    "gateway_breaker_policy_overridden",
    "gateway_breaker_store_up",
    "gateway_breaker_store_errors_total",
    "gateway_breaker_instance_info",
    "gateway_breaker_propagation_delay_seconds_bucket",
}


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    """Run promtool (Debian's `prometheus` package; .ci/run installs it). Missing: a failure."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: apt-get install prometheus (.ci/run does)")
    return subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


# -- alert rules -------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def test_alert_rules_unit_tests_pass() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_catches_a_broken_rule(tmp_path: Path) -> None:
    """The check is real: a rule with a syntax error fails it."""
    doc = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    doc["groups"][0]["rules"][0]["expr"] = "max by (service (gateway_breaker_state"
    broken = tmp_path / "alerts.yml"
    broken.write_text(yaml.safe_dump(doc))
    result = promtool("check", "rules", str(broken), cwd=tmp_path)
    assert result.returncode != 0


def test_alerts_cover_what_operators_asked_for() -> None:
    doc = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    rules = {rule["alert"]: rule for group in doc["groups"] for rule in group["rules"]}
    assert {
        "CircuitBreakerOpen",
        "CircuitBreakerFlapping",
        "CircuitBreakerStoreDown",
        "CircuitBreakerInstancesDisagree",
    } <= set(rules)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"], name
        assert set(re.findall(r"gateway_breaker_\w+", rule["expr"])) <= METRIC_NAMES, name


def test_prometheus_config_of_the_compose_fleet_is_valid() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    doc = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    targets = doc["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["gateway-1:8000", "gateway-2:8000"]
    assert doc["scrape_configs"][0]["metrics_path"] == "/metrics"


def test_compose_fleet_runs_prometheus_with_these_files() -> None:
    compose = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
    service = compose["services"]["prometheus"]
    assert "9090:9090" in service["ports"]
    assert set(service["depends_on"]) == {"gateway-1", "gateway-2"}
    (mount,) = service["volumes"]
    assert (REPO_ROOT / mount["source"]).resolve() == PROMETHEUS_DIR
    assert mount["target"] == "/etc/prometheus"
    assert mount["read_only"] is True


# -- Grafana dashboard -------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict)
    return doc


def panel_queries(doc: dict[str, Any]) -> dict[str, list[str]]:
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in doc["panels"]}


def test_dashboard_has_the_expected_panels() -> None:
    doc = dashboard()
    assert doc["uid"] == "gateway-breaker"
    queries = panel_queries(doc)
    assert set(queries) == {
        "Breaker state per instance",
        "Breakers not closed (fleet)",
        "Instances per state (fleet)",
        "Call outcomes",
        "Rejections (breaker 503s)",
        "Failure rate",
        "Transitions",
        "Store up",
        "Store errors",
        "Propagation delay (p50, p99)",
        "Instances",
    }
    # Per instance and fleet-wide: the rejections and failure rate panels show both.
    assert any("instance" in q for q in queries["Rejections (breaker 503s)"])
    assert any("by (service)" in q for q in queries["Rejections (breaker 503s)"])
    assert any("window_failures" in q for q in queries["Failure rate"])
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert variables == {"datasource", "service", "instance"}
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_use_only_exported_metrics() -> None:
    for title, exprs in panel_queries(dashboard()).items():
        for expr in exprs:
            assert set(re.findall(r"gateway_breaker_\w+", expr)) <= METRIC_NAMES, title


def as_rules(exprs: list[str]) -> dict[str, Any]:
    """Queries as recording rules (Grafana's variables filled in) so promtool parses them."""
    rules = []
    for i, expr in enumerate(exprs):
        expr = expr.replace("$__rate_interval", "1m").replace("$service", ".*")
        rules.append({"record": f"dashboard:query:{i}", "expr": expr.replace("$instance", ".*")})
    return {"groups": [{"name": "dashboard", "rules": rules}]}


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    exprs = [e for group in panel_queries(dashboard()).values() for e in group]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(as_rules(exprs)))
    result = promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout
