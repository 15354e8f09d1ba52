"""/metrics on example gateways, scraped by a real Prometheus (Debian's `prometheus` package).

Two gateways share a real redis-server; Prometheus is started by the test on a free port with a
generated scrape config and its storage in tmp_path. A third test runs one gateway under
`uvicorn --workers 2` in prometheus-client's multiprocess mode.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import port_for
import pytest
import yaml
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RedisServer
from tests.e2e.conftest import (
    REPO_ROOT,
    ServerProcess,
    StartGateway,
    Upstream,
    clean_env,
    make_config,
)
from tests.helpers import wait_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]
# A developer's shell may be in prometheus-client's multiprocess mode; these gateways are not.
SINGLE_PROCESS: dict[str, str | None] = {"PROMETHEUS_MULTIPROC_DIR": None}
ONLY_OPEN = {
    "closed": 0, "open": 1, "half_open": 0, "forced_open": 0, "disabled": 0, "metrics_only": 0,
}  # fmt: skip


def scrape(gateway: ServerProcess, client: httpx.Client | None = None) -> Samples:
    """The gateway's /metrics, parsed: sample name -> {sorted labels: value}."""
    response = (client or gateway.client).get("/metrics")
    assert response.status_code == 200, response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get(name, {}).get(tuple(sorted(labels.items())))


def states(samples: Samples, service: str) -> dict[str, float]:
    return {
        dict(key)["state"]: v
        for key, v in samples["gateway_breaker_state"].items()
        if dict(key)["service"] == service
    }


def transitions(samples: Samples, service: str) -> dict[tuple[str, str, str], float]:
    """(from, to, origin) -> count, of the transitions that happened (not the 0 placeholders)."""
    found = {}
    for key, v in samples.get("gateway_breaker_transitions_total", {}).items():
        labels = dict(key)
        if labels["service"] == service and v > 0:
            found[(labels["from"], labels["to"], labels["origin"])] = v
    return found


class Prometheus:
    """A prometheus server of the test's own: scrapes `targets` every second."""

    def __init__(self, tmp_path: Path, targets: list[str]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is not installed: apt-get install prometheus (.ci/run does)")
        self.port = port_for.select_random()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "gateways", "static_configs": [{"targets": targets}]}],
        }
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp_path / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.url, timeout=5.0, trust_env=False)
        wait_until_sync(self._ready, 30, 0.1, "prometheus to be ready")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError("prometheus exited:\n" + self.log_path.read_text())
        try:
            return self.client.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = self.client.get("/api/v1/query", params={"query": expr})
        body = response.json()
        assert body["status"] == "success", body
        result = body["data"]["result"]
        assert isinstance(result, list)
        return result

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        server = Prometheus(tmp_path, targets)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def target(gateway: ServerProcess) -> str:
    return f"127.0.0.1:{gateway.port}"


def test_two_gateways_report_a_trip_and_prometheus_sees_it_on_both(
    start_gateway: StartGateway,
    upstream: Upstream,
    redis_server: RedisServer,
    start_prometheus: Any,
) -> None:
    config = make_config(upstream.url, timeout_seconds=60) | {"metrics": {"enabled": True}}
    first = start_gateway(config, redis_url=redis_server.url, env=SINGLE_PROCESS)
    second = start_gateway(config, redis_url=redis_server.url, env=SINGLE_PROCESS)
    prometheus = start_prometheus([target(first), target(second)])

    for _ in range(5):
        assert first.get("/discovery/status/200").status_code == 200
    for _ in range(3):
        assert first.get("/discovery/status/500").status_code == 500
    for _ in range(2):
        rejected = first.get("/discovery/items")
        assert rejected.status_code == 503
        assert rejected.headers["x-circuit-breaker"] == "open"

    samples = scrape(first)
    assert states(samples, "discovery") == ONLY_OPEN
    calls = {
        o: value(samples, "gateway_breaker_calls_total", service="discovery", outcome=o)
        for o in ("success", "failure", "rejected", "slow", "ignored")
    }
    assert calls == {"success": 5, "failure": 3, "rejected": 2, "slow": 0, "ignored": 0}
    assert transitions(samples, "discovery") == {("closed", "open", "local"): 1}
    assert value(samples, "gateway_breaker_store_up") == 1

    # The second gateway learns of it through Redis: open, adopted from the fleet.
    wait_until_sync(
        lambda: states(scrape(second), "discovery")["open"] == 1, 10, 0.05, "second gateway open"
    )
    samples = scrape(second)
    assert states(samples, "discovery") == ONLY_OPEN
    assert transitions(samples, "discovery") == {("closed", "open", "fleet"): 1}
    assert value(samples, "gateway_breaker_store_up") == 1
    assert (
        value(samples, "gateway_breaker_calls_total", service="discovery", outcome="success") == 0
    )
    # The opening reached it through Redis: its adoption delay is observed (once, here only).
    assert value(samples, "gateway_breaker_propagation_delay_seconds_count") == 1
    assert value(scrape(first), "gateway_breaker_propagation_delay_seconds_count") == 0

    # Prometheus scraped both: a query for the open state returns both instances.
    query = 'gateway_breaker_state{service="discovery", state="open"} == 1'

    def both_open() -> bool:
        return {r["metric"]["instance"] for r in prometheus.query(query)} == {
            target(first),
            target(second),
        }

    wait_until_sync(both_open, 20, 0.2, "prometheus to see discovery open on both gateways")
    opened = prometheus.query(
        'sum by (instance, origin) (gateway_breaker_transitions_total{to="open"}) > 0'
    )
    assert {(r["metric"]["instance"], r["metric"]["origin"]) for r in opened} == {
        (target(first), "local"),
        (target(second), "fleet"),
    }

    # Redis dies: both gateways report the store down within seconds.
    redis_server.kill()
    for gateway in (first, second):
        wait_until_sync(
            lambda g=gateway: value(scrape(g), "gateway_breaker_store_up") == 0,
            15,
            0.1,
            f"{gateway.name} to report store_up 0",
        )
    wait_until_sync(
        lambda: len(prometheus.query("gateway_breaker_store_up == 0")) == 2,
        20,
        0.2,
        "prometheus to see both stores down",
    )
    # The gateways still answer from memory.
    assert first.get("/discovery/items").headers["x-circuit-breaker"] == "open"


def test_dashboard_queries_run_against_the_scraped_gateways(
    start_gateway: StartGateway, upstream: Upstream, start_prometheus: Any
) -> None:
    """Every query of the Grafana dashboard is accepted by Prometheus and shows data."""
    config = make_config(upstream.url) | {"metrics": {"enabled": True}}
    gateway = start_gateway(config, env=SINGLE_PROCESS)
    prometheus = start_prometheus([target(gateway)])
    # A few scrapes of the closed breaker first, so that rates and increases have a before.
    wait_until_sync(
        lambda: any(
            float(r["value"][1]) >= 3
            for r in prometheus.query("count_over_time(gateway_breaker_state[1m])")
        ),
        20,
        0.2,
        "three scrapes",
    )
    for _ in range(3):
        gateway.get("/discovery/status/500")
    gateway.get("/discovery/items")
    wait_until_sync(
        lambda: bool(
            prometheus.query('increase(gateway_breaker_calls_total{outcome="rejected"}[1m]) > 0')
        ),
        20,
        0.2,
        "prometheus to see the rejection",
    )
    dashboard = json.loads((REPO_ROOT / "deploy/grafana/gateway-breaker.json").read_text())
    empty = set()
    for panel in dashboard["panels"]:
        for query in panel["targets"]:
            expr = query["expr"].replace("$__rate_interval", "1m")
            expr = expr.replace("$service", ".*").replace("$instance", ".*")
            if not prometheus.query(expr):  # raises if Prometheus rejects the query
                empty.add((panel["title"], query["refId"]))
    # In memory there is no store: only its panels are empty.
    assert empty == {("Store up", "A"), ("Store errors", "A")}


class WorkersGateway(ServerProcess):
    """The example gateway under `uvicorn --workers 2`."""

    health_path = "/healthz"

    def __init__(self, env: dict[str, str], logdir: Path, workers: int = 2) -> None:
        super().__init__(
            "gateway-workers",
            "examples.gateway:app",
            env,
            logdir,
            extra_args=["--workers", str(workers)],
        )


def successes_by_worker(directory: Path) -> dict[int, float]:
    """discovery's success count in each worker's multiprocess file, by pid."""
    found: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.split("_")[-1])
        for key, count, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            _, name, labels, _ = json.loads(key)
            if name == "gateway_breaker_calls_total" and labels == {
                "service": "discovery",
                "outcome": "success",
            }:
                found[pid] = found.get(pid, 0.0) + count
    return found


def test_every_scrape_reports_the_total_of_both_workers(tmp_path: Path, upstream: Upstream) -> None:
    directory = tmp_path / "multiproc"
    directory.mkdir()
    config = make_config(upstream.url, failure_threshold=1000) | {"metrics": {"enabled": True}}
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(json.loads(json.dumps(config))))
    env = clean_env(
        {"GATEWAY_BREAKER_CONFIG": str(config_path), "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    )
    gateway = WorkersGateway(env, tmp_path)
    try:
        gateway.wait_ready()
        sent = 0

        def one_more_then_both_served() -> bool:
            nonlocal sent
            # A new connection each time, so the kernel may hand it to either worker.
            with httpx.Client(base_url=gateway.url, trust_env=False, timeout=10) as client:
                assert client.get("/discovery/status/200").status_code == 200
            sent += 1
            served = successes_by_worker(directory)
            return len([pid for pid, n in served.items() if n > 0]) == 2

        wait_until_sync(one_more_then_both_served, 60, 0.02, "both workers to serve a request")

        def reported() -> float | None:
            with httpx.Client(base_url=gateway.url, trust_env=False, timeout=10) as client:
                samples = scrape(gateway, client)
            return value(
                samples, "gateway_breaker_calls_total", service="discovery", outcome="success"
            )

        # Each worker writes its counts within a second; then every scrape has the total.
        wait_until_sync(lambda: reported() == sent, 10, 0.1, f"a scrape to report {sent}")
        for _ in range(10):
            assert reported() == sent
        samples = scrape(gateway)
        assert len(samples["gateway_breaker_instance_info"]) == 2  # one manager per worker
        assert value(samples, "gateway_breaker_state", service="discovery", state="closed") == 1
        assert value(samples, "gateway_breaker_state", service="discovery", state="open") == 0
    finally:
        gateway.stop()
