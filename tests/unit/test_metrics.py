"""Metrics: the collector's families, the /metrics app, OpenTelemetry, alert rules, dashboard.

The collector reads a real in-memory manager driven with a FakeClock. The alert rules are run by
Prometheus's own `promtool` (check and unit tests), and every dashboard query is parsed by it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Receive, Scope, Send

from gateway_breaker import (
    BreakerSnapshot,
    CircuitBreakerManager,
    CircuitBreakerMiddleware,
    CircuitOpenError,
    CircuitState,
    MetricsSettings,
    TransitionEvent,
)
from gateway_breaker.metrics import (
    FAMILIES,
    OUTCOMES,
    STATES,
    BreakerCollector,
    PropagationDelay,
    metrics_app,
    text_format,
)
from gateway_breaker.otel import instrument, otel_name
from tests.helpers import FakeClock
from tests.unit.support import make_config

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
    "gateway_breaker_health",
    "gateway_breaker_rejection_probability",
    "gateway_breaker_consecutive_failures",
    "gateway_breaker_retry_after_seconds",
    "gateway_breaker_policy_overridden",
    "gateway_breaker_store_up",
    "gateway_breaker_store_errors_total",
    "gateway_breaker_store_rejected_values_total",
    "gateway_breaker_instance_info",
    "gateway_breaker_propagation_delay_seconds_bucket",
}


@pytest.fixture(autouse=True)
def single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's shell may be in prometheus-client's multiprocess mode; these tests are not."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


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
    assert "SUCCESS: 7 rules found" in result.stdout


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
        "CircuitBreakerUnhealthy",
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


def test_example_and_fleet_configs_turn_metrics_on() -> None:
    for path in (REPO_ROOT / "examples" / "config.yaml", REPO_ROOT / "deploy" / "fleet.yaml"):
        doc = yaml.safe_load(path.read_text())
        assert doc["metrics"] == {"enabled": True}, path


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
        "Health and shedding",
    }
    health = queries["Health and shedding"]
    assert any("gateway_breaker_health" in q for q in health)
    assert any('outcome="shed"' in q for q in health)
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


# -- the collector, on a real in-memory manager ------------------------------------------------

SERVICES: dict[str, dict[str, Any]] = {
    "discovery": {"failure_threshold": 3, "timeout_seconds": 10, "min_calls": 4},
    "sona": {"failure_threshold": 5},
}


class Boom(Exception):
    pass


def boom() -> None:
    raise Boom("upstream down")


@pytest.fixture
def manager(clock: FakeClock) -> CircuitBreakerManager:
    return CircuitBreakerManager(make_config(SERVICES), clock=clock)


def scrape(registry: CollectorRegistry) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The registry's text output parsed back: sample name -> {sorted labels: value}."""
    text = generate_latest(registry).decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


def value(samples: dict[str, Any], name: str, **labels: str) -> float:
    return float(samples[name][tuple(sorted(labels.items()))])


async def trip(manager: CircuitBreakerManager, successes: int = 5, rejections: int = 2) -> None:
    """The issue's sequence: 5 successes, 3 failures (threshold 3), 2 rejections."""
    for _ in range(successes):
        await manager.call("discovery", lambda: "ok")
    for _ in range(3):
        with pytest.raises(Boom):
            await manager.call("discovery", boom)
    for _ in range(rejections):
        with pytest.raises(CircuitOpenError):
            await manager.call("discovery", lambda: "ok")


@pytest.fixture
def registry(manager: CircuitBreakerManager) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(BreakerCollector(manager))
    return registry


async def test_state_is_one_hot_over_the_six_states(
    manager: CircuitBreakerManager, registry: CollectorRegistry
) -> None:
    await manager.start()
    await trip(manager)
    samples = scrape(registry)
    for service, current in (("discovery", "open"), ("sona", "closed")):
        for state in STATES:
            expected = 1.0 if state == current else 0.0
            assert value(samples, "gateway_breaker_state", service=service, state=state) == expected
    assert len(samples["gateway_breaker_state"]) == 2 * 6


async def test_calls_by_outcome_and_the_opening_transition(
    manager: CircuitBreakerManager, registry: CollectorRegistry
) -> None:
    await manager.start()
    await trip(manager)
    samples = scrape(registry)
    calls = {
        o: value(samples, "gateway_breaker_calls_total", service="discovery", outcome=o)
        for o in OUTCOMES
    }
    assert calls == {"success": 5, "failure": 3, "slow": 0, "rejected": 2, "shed": 0, "ignored": 0}
    opened = value(
        samples, "gateway_breaker_transitions_total",
        service="discovery", origin="local", **{"from": "closed", "to": "open"},
    )  # fmt: skip
    assert opened == 1
    assert value(samples, "gateway_breaker_consecutive_failures", service="discovery") == 3
    assert value(samples, "gateway_breaker_retry_after_seconds", service="discovery") == 10


async def test_manual_transitions_are_counted_with_origin_manual(
    manager: CircuitBreakerManager, registry: CollectorRegistry
) -> None:
    await manager.start()
    await manager.set_manual("sona", "forced_open", reason="maintenance")
    samples = scrape(registry)
    assert value(samples, "gateway_breaker_state", service="sona", state="forced_open") == 1
    assert value(samples, "gateway_breaker_state", service="sona", state="closed") == 0
    forced = value(
        samples, "gateway_breaker_transitions_total",
        service="sona", origin="manual", **{"from": "closed", "to": "forced_open"},
    )  # fmt: skip
    assert forced == 1


async def test_failure_rate_is_nan_until_min_calls(
    manager: CircuitBreakerManager, registry: CollectorRegistry, clock: FakeClock
) -> None:
    await manager.start()
    await manager.call("discovery", lambda: "ok")
    samples = scrape(registry)
    assert math.isnan(value(samples, "gateway_breaker_failure_rate", service="discovery"))
    assert value(samples, "gateway_breaker_window_calls", service="discovery") == 1
    for _ in range(2):
        await manager.call("discovery", lambda: "ok")
    with pytest.raises(Boom):
        await manager.call("discovery", boom)
    samples = scrape(registry)
    assert value(samples, "gateway_breaker_failure_rate", service="discovery") == 0.25
    assert value(samples, "gateway_breaker_window_failures", service="discovery") == 1


async def test_in_memory_there_is_no_store_up_and_no_store_errors(
    manager: CircuitBreakerManager, registry: CollectorRegistry
) -> None:
    await manager.start()
    samples = scrape(registry)
    assert "gateway_breaker_store_up" not in samples
    assert "gateway_breaker_store_errors_total" not in samples
    (labels,) = samples["gateway_breaker_instance_info"]
    assert dict(labels) == {"instance_id": manager.instance_id, "store": "memory"}


async def test_services_created_after_start_appear(
    manager: CircuitBreakerManager, registry: CollectorRegistry
) -> None:
    await manager.start()
    assert ("service", "search") not in {
        label for key in scrape(registry)["gateway_breaker_state"] for label in key
    }
    await manager.call("search", lambda: "ok")
    samples = scrape(registry)
    assert value(samples, "gateway_breaker_calls_total", service="search", outcome="success") == 1


def parsed(text: str) -> dict[str, Any]:
    """Parsed samples with NaN made comparable."""
    samples: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, family.name
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = "NaN" if math.isnan(sample.value) else sample.value
    return samples


async def test_the_fast_text_format_says_what_prometheus_client_says(
    manager: CircuitBreakerManager,
) -> None:
    await manager.start()
    await trip(manager)
    await manager.set_manual("sona", "metrics_only")
    collector = BreakerCollector(manager)
    collector.delay.observe(0.003)
    registry = CollectorRegistry()
    registry.register(collector)
    fast = text_format(collector).decode()
    assert parsed(fast) == parsed(generate_latest(registry).decode())
    assert len(parsed(fast)) > 2 * 20  # both services, every family


def test_collector_goes_on_a_users_registry_beside_their_metrics(
    manager: CircuitBreakerManager,
) -> None:
    manager.get("discovery")  # not started: only the breakers created so far show
    registry = CollectorRegistry()
    mine = Counter("myapp_requests", "the app's own", registry=registry)
    mine.inc(7)
    registry.register(BreakerCollector(manager))
    samples = scrape(registry)
    assert value(samples, "myapp_requests_total") == 7
    assert "gateway_breaker_state" in samples
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(BreakerCollector(manager))  # describe() names the families


async def test_propagation_delay_counts_openings_adopted_from_the_fleet(
    manager: CircuitBreakerManager, clock: FakeClock
) -> None:
    await manager.start()
    breaker = manager.get("sona")
    # Another instance opened it 0.2 s ago; this one adopts it now.
    breaker.restore(BreakerSnapshot(state=CircuitState.OPEN, opened_at=clock.now - 0.2, version=3))
    delay = PropagationDelay(manager)

    def event(origin: str, to_state: str) -> TransitionEvent:
        return TransitionEvent(
            service="sona", at=clock.now, from_state="closed", to_state=to_state,
            cause="failure_threshold", origin=origin, instance="abc", version=3,
            failure_count=3, failure_rate=None, reason=None,
        )  # fmt: skip

    delay(event("fleet", "open"))
    delay(event("local", "open"))  # made here: no delay to speak of
    delay(event("manual", "forced_open"))
    delay(event("fleet", "half_open"))  # only openings carry the other instance's time
    family = delay.family()
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert buckets["0.1"] == 0
    assert buckets["0.25"] == 1
    assert buckets["+Inf"] == 1
    assert [s.value for s in family.samples if s.name.endswith("_count")] == [1]
    assert [s.value for s in family.samples if s.name.endswith("_sum")] == [pytest.approx(0.2)]


# -- the /metrics app and the middleware -------------------------------------------------------


async def get(app: Any, path: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        return await client.request(kwargs.pop("method", "GET"), path, **kwargs)


async def test_metrics_app_serves_the_text_format(manager: CircuitBreakerManager) -> None:
    await manager.start()
    app = metrics_app(manager)
    response = await get(app, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    key = ("gateway_breaker_state", (("service", "discovery"), ("state", "closed")))
    assert parsed(response.text)[key] == 1
    head = await get(app, "/metrics", method="HEAD")
    assert head.status_code == 200
    assert head.content == b""
    openmetrics = await get(app, "/metrics", headers={"accept": "application/openmetrics-text"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")
    post = await get(app, "/metrics", method="POST")
    assert post.status_code == 405
    assert post.headers["allow"] == "GET, HEAD"


async def test_metrics_app_serves_a_given_registry_with_the_users_metrics(
    manager: CircuitBreakerManager,
) -> None:
    registry = CollectorRegistry()
    Counter("myapp_jobs", "the app's own", registry=registry).inc()
    response = await get(metrics_app(manager, registry), "/metrics")
    assert "myapp_jobs_total 1.0" in response.text
    assert "gateway_breaker_calls_total" in response.text


class Inner:
    """The app behind the middleware: counts the paths it is called for."""

    def __init__(self, status: int = 200) -> None:
        self.paths: list[str] = []
        self.status = status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"inner"})


async def test_middleware_serves_metrics_when_enabled_before_any_prefix() -> None:
    config = make_config(
        {"root": {"prefix": "/", "failure_threshold": 3}}, enabled=True
    ).model_copy(update={"metrics": MetricsSettings(enabled=True)})
    inner = Inner()
    app = CircuitBreakerMiddleware(inner, config=config)
    await get(app, "/anything")
    response = await get(app, "/metrics")
    assert response.status_code == 200
    assert inner.paths == ["/anything"]  # /metrics never reached the app nor the breaker
    key = ("gateway_breaker_calls_total", (("outcome", "success"), ("service", "root")))
    assert parsed(response.text)[key] == 1


async def test_middleware_serves_metrics_at_the_configured_path() -> None:
    config = make_config({"sona": {}}).model_copy(
        update={"metrics": MetricsSettings(enabled=True, path="/_internal/metrics")}
    )
    inner = Inner()
    app = CircuitBreakerMiddleware(inner, config=config)
    assert (await get(app, "/_internal/metrics")).text.startswith("# HELP")
    assert (await get(app, "/metrics")).text == "inner"
    assert inner.paths == ["/metrics"]


async def test_metrics_are_off_by_default() -> None:
    inner = Inner()
    app = CircuitBreakerMiddleware(inner, config=make_config({"sona": {}}))
    assert (await get(app, "/metrics")).text == "inner"
    assert inner.paths == ["/metrics"]


async def test_a_breaker_rejection_says_so_in_a_header() -> None:
    inner = Inner(status=500)
    app = CircuitBreakerMiddleware(inner, config=make_config({"sona": {"failure_threshold": 1}}))
    failed = await get(app, "/sona/x")
    assert failed.status_code == 500
    assert "x-circuit-breaker" not in failed.headers  # the upstream's own 5xx carries none
    rejected = await get(app, "/sona/x")
    assert rejected.status_code == 503
    assert rejected.headers["x-circuit-breaker"] == "open"
    assert inner.paths == ["/sona/x"]


async def test_a_forced_open_rejection_names_the_manual_state() -> None:
    manager = CircuitBreakerManager(make_config({"sona": {}}))
    await manager.start()
    await manager.set_manual("sona", "forced_open")
    app = CircuitBreakerMiddleware(Inner(), manager=manager)
    rejected = await get(app, "/sona/x")
    assert rejected.status_code == 503
    assert rejected.headers["x-circuit-breaker"] == "forced_open"


# -- OpenTelemetry -----------------------------------------------------------------------------


def otel_points(reader: InMemoryMetricReader) -> dict[str, dict[tuple[tuple[str, Any], ...], Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, dict[tuple[tuple[str, Any], ...], Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    key = tuple(sorted((point.attributes or {}).items()))
                    points.setdefault(metric.name, {})[key] = point
    return points


async def test_otel_instruments_match_the_prometheus_families(
    manager: CircuitBreakerManager,
) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instruments = instrument(manager, meter_provider=provider)
    await manager.start()
    await trip(manager)
    points = otel_points(reader)
    assert set(instruments.by_name) == {otel_name(f) for f in FAMILIES}
    state = points["gateway_breaker.state"]
    assert state[(("service", "discovery"), ("state", "open"))].value == 1
    assert state[(("service", "discovery"), ("state", "closed"))].value == 0
    calls = points["gateway_breaker.calls"]
    assert calls[(("outcome", "success"), ("service", "discovery"))].value == 5
    assert calls[(("outcome", "rejected"), ("service", "discovery"))].value == 2
    transitions = points["gateway_breaker.transitions"]
    key = (("from", "closed"), ("origin", "local"), ("service", "discovery"), ("to", "open"))
    assert transitions[key].value == 1
    assert points["gateway_breaker.retry_after"][(("service", "discovery"),)].value == 10
    rates = points["gateway_breaker.failure_rate"]
    assert rates[(("service", "discovery"),)].value == 3 / 8
    assert (("service", "sona"),) not in rates  # below min_calls: nothing, not NaN
    assert "gateway_breaker.store_up" not in points  # in memory
    instruments.close()
    provider.shutdown()


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )


def test_without_the_extra_otel_raises_an_import_error_naming_it() -> None:
    # The interpreter is told the package is absent (a None entry makes its import fail).
    result = run_python(
        "import sys; sys.modules['opentelemetry'] = None\n"
        "try:\n    import gateway_breaker.otel\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'gateway-breaker[otel]'" in result.stdout


def test_importing_the_package_imports_neither_prometheus_client_nor_opentelemetry() -> None:
    # redis-py itself imports opentelemetry when it is installed: only what the package adds
    # counts.
    result = run_python(
        "import sys, redis.asyncio\n"
        "before = set(sys.modules)\n"
        "import gateway_breaker\n"
        "from gateway_breaker import CircuitBreakerMiddleware, Config\n"
        "CircuitBreakerMiddleware(lambda *a: None, config=Config())\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in"
        " ('prometheus_client', 'opentelemetry') or m == 'gateway_breaker.otel'))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- several workers: the exporter and prometheus-client's multiprocess files ------------------

WORKER = """
import asyncio, os, sys
from gateway_breaker import CircuitBreakerManager, Config
from gateway_breaker.metrics import WorkerExporter

async def main(successes: int, state: str) -> None:
    config = Config(circuit_breaker={"services": {"sona": {"failure_threshold": 1}}})
    manager = CircuitBreakerManager(config)
    await manager.start()
    exporter = WorkerExporter(manager)
    for _ in range(successes):
        await manager.call("sona", lambda: None)
    exporter.write()
    exporter.write()  # a second write adds nothing: only changes are written
    if state == "open":
        try:
            await manager.call("sona", lambda: 1 / 0)
        except ZeroDivisionError:
            pass
    exporter.write()
    if state == "exited":
        await exporter.stop()  # at shutdown: the live gauges go, the counts stay

asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
"""


def run_worker(directory: Path, successes: int, state: str) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(successes), state],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_workers_counts_add_up_and_their_gauges_combine(tmp_path: Path) -> None:
    run_worker(tmp_path, 4, "closed")
    run_worker(tmp_path, 6, "open")
    run_worker(tmp_path, 100, "exited")
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
    samples = scrape(registry)
    # Counters: every worker's, also the one that exited.
    assert value(samples, "gateway_breaker_calls_total", service="sona", outcome="success") == 110
    assert value(samples, "gateway_breaker_calls_total", service="sona", outcome="failure") == 1
    # Gauges: the live workers only; the state is the highest, so "open" shows.
    assert value(samples, "gateway_breaker_state", service="sona", state="open") == 1
    assert value(samples, "gateway_breaker_state", service="sona", state="closed") == 1
    assert value(samples, "gateway_breaker_window_calls", service="sona") == 4 + 7
    assert len(samples["gateway_breaker_instance_info"]) == 2
    assert "gateway_breaker_store_up" not in samples  # in memory
