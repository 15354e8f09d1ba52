"""The admin API on three example gateways under uvicorn sharing one real redis-server.

One fleet serves the whole module (booting gateways is the slow part); every test leaves the
services as it found them: no manual mode, the file's policy, closed on every instance.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import port_for
import pytest
import yaml

from tests.conftest import RedisServer
from tests.e2e.conftest import Gateway, StartGateway, Upstream, clean_env, counts, make_config
from tests.helpers import wait_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

TOKEN = "e2e-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
API = "/_breakers"
SERVICES = ("discovery", "sona", "auth")
# The bounds from the issue.
FLEET_BOUND_SECONDS = 0.2


class Fleet:
    """Three gateways on one Redis key prefix, plus what a later instance needs to join."""

    def __init__(self, gateways: list[Gateway], config_path: Path, env: dict[str, str]) -> None:
        self.gateways = gateways
        self.config_path = config_path
        self.env = env

    def api(self, gateway: Gateway, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return gateway.request(method, API + path, headers=AUTH, **kwargs)

    def view(self, gateway: Gateway, service: str = "discovery") -> dict[str, Any]:
        response = self.api(gateway, "GET", f"/breakers/{service}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, upstream: Upstream, redis_shared: RedisServer
) -> Iterator[Fleet]:
    logdir = tmp_path_factory.mktemp("admin-fleet")
    config = make_config(upstream.url)
    for name in ("sona", "auth"):
        config["circuit_breaker"]["services"][name]["failure_threshold"] = 3
    config["circuit_breaker"]["services"]["discovery"]["timeout_seconds"] = 30
    config["redis"] = {"key_prefix": f"admin_{uuid.uuid4().hex[:8]}"}
    path = logdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        "GATEWAY_BREAKER_CONFIG": str(path),
        "REDIS_URL": redis_shared.url,
        "GATEWAY_BREAKER_ADMIN_TOKEN": TOKEN,
        "LOG_LEVEL": "debug",
    }
    gateways = [
        Gateway(f"gateway{i}", "examples.gateway:app", clean_env(env), logdir) for i in (1, 2, 3)
    ]
    try:
        for gateway in gateways:
            gateway.wait_ready()
        yield Fleet(gateways, path, env)
    finally:
        for gateway in gateways:
            gateway.stop()


@pytest.fixture(autouse=True)
def tidy(fleet: Fleet) -> Iterator[None]:
    """After each test: every manual mode and policy override lifted, every breaker closed."""
    yield
    first = fleet.gateways[0]
    for service in SERVICES:
        for method, path in [("DELETE", "manual"), ("DELETE", "policy"), ("POST", "reset")]:
            response = fleet.api(first, method, f"/breakers/{service}/{path}")
            assert response.status_code == 200, response.text
    for gateway in fleet.gateways:
        for service in SERVICES:
            wait_until_sync(
                lambda g=gateway, s=service: settled(fleet.view(g, s)),
                timeout=5,
                message=f"{service} closed on {gateway.name}",
            )


def settled(view: dict[str, Any]) -> bool:
    return bool(
        view["state"] == "closed" and view["manual"] is None and not view["policy_overridden"]
    )


def rejects(gateway: Gateway, service: str = "discovery") -> bool:
    response = gateway.get(f"/{service}/status/200")
    assert response.status_code in (200, 503), response.text
    return response.status_code == 503


def open_through(gateway: Gateway, failures: int = 3, service: str = "discovery") -> None:
    for _ in range(failures):
        assert gateway.get(f"/{service}/status/500").status_code == 500


# -- auth, validation, routing ----------------------------------------------------------------


def test_no_token_wrong_token_unknown_service_invalid_policy(fleet: Fleet) -> None:
    gateway = fleet.gateways[0]
    no_token = gateway.get(f"{API}/breakers")
    assert no_token.status_code == 401
    assert no_token.headers["content-type"] == "application/problem+json"
    assert no_token.headers["www-authenticate"].startswith("Bearer")
    wrong = gateway.get(f"{API}/breakers", headers={"Authorization": "Bearer not-it"})
    assert wrong.status_code == 401
    assert "not-it" not in wrong.text

    unknown = fleet.api(gateway, "GET", "/breakers/nosuch")
    assert unknown.status_code == 404
    assert unknown.json()["detail"] == "unknown service 'nosuch'"

    invalid = fleet.api(gateway, "PATCH", "/breakers/sona/policy", json={"failure_threshold": 0})
    assert invalid.status_code == 422
    assert invalid.json()["errors"][0]["field"] == "failure_threshold"
    assert "failure_threshold" in invalid.json()["detail"]

    listed = fleet.api(gateway, "GET", "/breakers").json()
    assert listed["store"] == "redis"
    assert listed["store_up"] is True
    assert {b["service"] for b in listed["breakers"]} >= set(SERVICES)
    # The token never reaches a log line.
    for g in fleet.gateways:
        assert TOKEN not in g.output()


def test_not_served_without_a_token(start_gateway: StartGateway, upstream: Upstream) -> None:
    gateway = start_gateway(make_config(upstream.url))
    response = gateway.get(f"{API}/breakers", headers=AUTH)
    assert response.status_code == 404  # the example gateway's own answer: no such service
    assert "no service is configured" in response.text


def test_the_admin_path_is_never_a_service_prefix(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    config = make_config(upstream.url)
    config["circuit_breaker"]["services"]["shadow"] = {
        "prefix": "/_breakers",
        "upstream": f"{upstream.url}/shadow",
        "failure_threshold": 1,
    }
    gateway = start_gateway(config, env={"GATEWAY_BREAKER_ADMIN_TOKEN": TOKEN})
    before = counts(upstream)
    response = gateway.get(f"{API}/breakers/shadow", headers=AUTH)
    assert response.status_code == 200
    assert response.json()["service"] == "shadow"
    assert before() == 0
    # The proxied path of other services gains nothing.
    echo = gateway.get("/discovery/echo/x").json()
    assert echo["path"] == "/discovery/echo/x"


# -- manual modes -----------------------------------------------------------------------------


def test_forced_open_is_fleet_wide_and_honoured_by_a_later_instance(
    fleet: Fleet, start_gateway: StartGateway, upstream: Upstream
) -> None:
    g1, g2, g3 = fleet.gateways
    for gateway in fleet.gateways:
        assert not rejects(gateway)
    response = fleet.api(
        g1, "PUT", "/breakers/discovery/manual", json={"mode": "forced_open", "reason": "INC-7"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "forced_open"
    wait_until_sync(lambda: rejects(g2), FLEET_BOUND_SECONDS, 0.005, "g2 to reject")
    reached = counts(upstream)
    for gateway in (g1, g2, g3):
        answer = gateway.get("/discovery/status/200")
        assert answer.status_code == 503
        assert answer.json()["state"] == "forced_open"
        assert "forced_open" in answer.json()["detail"]
    assert reached() == 0

    later = start_gateway(fleet.config_path, redis_url=fleet.env["REDIS_URL"], env=fleet.env)
    assert rejects(later)  # its very first request
    assert reached() == 0
    view = fleet.view(later)
    assert view["state"] == "forced_open"
    assert view["manual"]["mode"] == "forced_open"
    assert view["manual"]["reason"] == "INC-7"

    assert fleet.api(g3, "DELETE", "/breakers/discovery/manual").status_code == 200
    for gateway in (g1, g2, g3, later):
        wait_until_sync(lambda g=gateway: not rejects(g), 2, 0.01, f"{gateway.name} to pass")


def test_a_timed_mode_ends_by_itself_everywhere(fleet: Fleet) -> None:
    g1 = fleet.gateways[0]
    # Long enough for every instance to be seen rejecting first, even on a busy machine.
    body = {"mode": "forced_open", "seconds": 3, "reason": "short"}
    assert fleet.api(g1, "PUT", "/breakers/sona/manual", json=body).status_code == 200
    for gateway in fleet.gateways:
        wait_until_sync(lambda g=gateway: rejects(g, "sona"), 2, 0.005, f"{gateway.name} rejects")
    for gateway in fleet.gateways:
        wait_until_sync(
            lambda g=gateway: fleet.view(g, "sona")["manual"] is None and not rejects(g, "sona"),
            10,
            0.02,
            f"the mode to end on {gateway.name}",
        )
    causes = [e["cause"] for e in fleet.api(g1, "GET", "/breakers/sona/history").json()["history"]]
    assert "manual_expired" in causes


@pytest.mark.parametrize("mode", ["disabled", "metrics_only"])
def test_disabled_and_metrics_only_never_reject(
    fleet: Fleet, upstream: Upstream, mode: str
) -> None:
    g1, g2, _g3 = fleet.gateways
    assert fleet.api(g2, "PUT", "/breakers/auth/manual", json={"mode": mode}).status_code == 200
    for gateway in fleet.gateways:
        wait_until_sync(
            lambda g=gateway: fleet.view(g, "auth")["state"] == mode, 2, 0.01, "the mode"
        )
    reached = counts(upstream)
    for gateway in fleet.gateways:
        for _ in range(5):
            assert gateway.get("/auth/status/500").status_code == 500
        assert not rejects(gateway, "auth")
    assert reached() == 18
    view = fleet.view(g1, "auth")
    assert view["state"] == mode
    if mode == "metrics_only":
        # The state machine runs and says so; it only never acts.
        wait_until_sync(
            lambda: fleet.view(g1, "auth")["automatic_state"] == "open", 2, 0.01, "open"
        )


def test_reset_through_one_closes_an_open_breaker_on_all(fleet: Fleet) -> None:
    g1, g2, _g3 = fleet.gateways
    open_through(g1)
    for gateway in fleet.gateways:
        wait_until_sync(lambda g=gateway: rejects(g), 2, 0.005, f"{gateway.name} to reject")
    response = fleet.api(g2, "POST", "/breakers/discovery/reset")
    assert response.status_code == 200
    assert response.json()["state"] == "closed"
    assert response.json()["failure_count"] == 0
    for gateway in fleet.gateways:
        wait_until_sync(lambda g=gateway: not rejects(g), 2, 0.005, f"{gateway.name} to pass")


def test_a_policy_change_applies_on_the_others(fleet: Fleet) -> None:
    g1, g2, g3 = fleet.gateways
    response = fleet.api(g1, "PATCH", "/breakers/sona/policy", json={"failure_threshold": 2})
    assert response.status_code == 200, response.text
    assert response.json()["policy"]["failure_threshold"] == 2
    for gateway in (g2, g3):
        wait_until_sync(
            lambda g=gateway: fleet.view(g, "sona")["policy"]["failure_threshold"] == 2,
            2,
            0.01,
            f"the new policy on {gateway.name}",
        )
        assert fleet.view(gateway, "sona")["policy_overridden"] is True
    open_through(g3, failures=2, service="sona")
    wait_until_sync(lambda: rejects(g2, "sona"), 2, 0.005, "two failures to open sona")

    back = fleet.api(g2, "DELETE", "/breakers/sona/policy")
    assert back.status_code == 200
    assert back.json()["policy"]["failure_threshold"] == 3
    for gateway in (g1, g3):
        wait_until_sync(
            lambda g=gateway: fleet.view(g, "sona")["policy"]["failure_threshold"] == 3,
            2,
            0.01,
            f"the file's policy again on {gateway.name}",
        )


def test_history_shows_manual_modes_with_reasons_and_automatic_causes(fleet: Fleet) -> None:
    g1, g2, g3 = fleet.gateways
    open_through(g1)
    # Stored (the instance that takes the command sees it), so the history has it first.
    wait_until_sync(lambda: fleet.view(g2)["state"] == "open", 2, 0.005, "discovery to open")
    body = {"mode": "forced_open", "reason": "upstream migration"}
    assert fleet.api(g2, "PUT", "/breakers/discovery/manual", json=body).status_code == 200
    assert fleet.api(g3, "DELETE", "/breakers/discovery/manual").status_code == 200

    def history() -> list[dict[str, Any]]:
        response = fleet.api(g2, "GET", "/breakers/discovery/history?limit=10")
        assert response.status_code == 200
        events: list[dict[str, Any]] = response.json()["history"]
        return events

    wait_until_sync(
        lambda: bool(history()) and history()[0]["cause"] == "manual_released",
        2,
        0.01,
        "the release in the history",
    )
    newest, manual, opened = history()[:3]
    assert newest["cause"] == "manual_released"
    assert manual["cause"] == "manual"
    assert manual["to"] == "forced_open"
    assert manual["reason"] == "upstream migration"
    assert opened["cause"] == "failure_threshold"
    assert (opened["from"], opened["to"]) == ("closed", "open")
    assert opened["failure_count"] >= 3
    assert newest["at"] >= manual["at"] >= opened["at"]


def test_the_fleet_view_lists_the_three_instances(fleet: Fleet) -> None:
    ids = {fleet.api(g, "GET", "/breakers").json()["instance"] for g in fleet.gateways}
    assert len(ids) == 3

    def listed() -> set[str]:
        body = fleet.api(fleet.gateways[1], "GET", "/fleet").json()
        return {instance["id"] for instance in body["instances"]}

    wait_until_sync(lambda: ids <= listed(), 5, 0.05, "the three instances in the fleet view")
    body = fleet.api(fleet.gateways[2], "GET", "/fleet").json()
    for instance in body["instances"]:
        if instance["id"] in ids:
            assert instance["pid"] in {g.process.pid for g in fleet.gateways}
            assert set(instance["breakers"]) >= set(SERVICES)


def test_events_stream_through_uvicorn(fleet: Fleet) -> None:
    g1, g2, _ = fleet.gateways
    with (
        httpx.Client(base_url=g2.url, timeout=10, trust_env=False) as client,
        client.stream("GET", f"{API}/events", headers=AUTH) as stream,
    ):
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        assert next(lines).startswith("retry:")
        body = {"mode": "disabled", "reason": "watch me"}
        assert fleet.api(g1, "PUT", "/breakers/auth/manual", json=body).status_code == 200
        data = None
        for line in lines:
            if line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                if data["service"] == "auth" and data["to"] == "disabled":
                    break
        assert data is not None
        assert data["breaker"]["state"] == "disabled"
        assert data["breaker"]["manual"]["reason"] == "watch me"


def test_redis_unreachable_commands_say_so(start_gateway: StartGateway, upstream: Upstream) -> None:
    dead = f"redis://127.0.0.1:{port_for.select_random()}/0"
    gateway = start_gateway(
        make_config(upstream.url), redis_url=dead, env={"GATEWAY_BREAKER_ADMIN_TOKEN": TOKEN}
    )
    listed = gateway.get(f"{API}/breakers", headers=AUTH).json()
    assert (listed["store"], listed["store_up"]) == ("redis", False)

    policy = gateway.request(
        "PATCH", f"{API}/breakers/sona/policy", headers=AUTH, json={"failure_threshold": 2}
    )
    assert policy.status_code == 503
    assert policy.headers["content-type"] == "application/problem+json"
    assert "not applied" in policy.json()["detail"]
    view = gateway.get(f"{API}/breakers/sona", headers=AUTH).json()
    assert view["policy"]["failure_threshold"] == 5
    assert view["policy_overridden"] is False

    manual = gateway.request(
        "PUT", f"{API}/breakers/sona/manual", headers=AUTH, json={"mode": "forced_open"}
    )
    assert manual.status_code == 503
    assert "this instance only" in manual.json()["detail"]
    assert gateway.get("/healthz").status_code == 200
