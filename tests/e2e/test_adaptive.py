"""Adaptive shedding, checked from outside: three example gateways on one redis-server, an
upstream failing 40% of calls."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RedisServer
from tests.e2e.conftest import Gateway, StartGateway, Upstream, make_config
from tests.e2e.test_fleet_evidence import start
from tests.helpers import wait_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

WINDOW = 5.0


def gauge(gateway: Gateway, name: str) -> float:
    """The gateway's `name{service="discovery"}` sample from /metrics."""
    for family in text_string_to_metric_families(gateway.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("service") == "discovery":
                return float(sample.value)
    raise AssertionError(f"{name} not in /metrics")


def shed_share(gateways: list[Gateway], path: str, rounds: int) -> list[float]:
    """Round robin over the gateways; each gateway's share of shed answers (checked whole)."""
    shed = [0] * len(gateways)
    for _ in range(rounds):
        for i, gateway in enumerate(gateways):
            response = gateway.get(path)
            if response.headers.get("x-circuit-breaker") == "shedding":
                assert response.status_code == 503
                assert response.headers["retry-after"] == "1"
                assert response.headers["cache-control"] == "no-store"
                assert json.loads(response.content)["state"] == "shedding"
                shed[i] += 1
            else:
                assert response.status_code in (200, 500), response.text
    return [n / rounds for n in shed]


def test_three_gateways_shed_the_same_share_of_a_brownout_and_stop_when_it_heals(
    redis_server: RedisServer, start_gateway: StartGateway, upstream: Upstream
) -> None:
    policy: dict[str, Any] = {
        "mode": "adaptive",
        "window_seconds": WINDOW,
        "min_calls": 20,
        "failure_threshold": 1000,  # no run of random failures opens it
    }
    config = make_config(upstream.url, **policy) | {"metrics": {"enabled": True}}
    config["redis"] = {"sync_interval_seconds": 1}
    gateways = start(start_gateway, redis_server, config, 3)

    # Fill the fleet's window, then measure (the formula gives 0.37 for 40% failures).
    shed_share(gateways, "/discovery/flaky?rate=0.4", 60)
    shares = shed_share(gateways, "/discovery/flaky?rate=0.4", 150)
    print(f"shed shares: {shares}")
    assert all(0.2 <= share <= 0.6 for share in shares), shares
    assert max(shares) - min(shares) <= 0.2, shares
    healths = [gauge(g, "gateway_breaker_health") for g in gateways]
    print(f"health: {healths} (formula 0.63)")
    assert all(0.45 <= h <= 0.8 for h in healths), healths
    assert all(gauge(g, "gateway_breaker_rejection_probability") > 0.15 for g in gateways)

    healed = time.monotonic()

    def stopped() -> bool:
        shed_share(gateways, "/discovery/status/200", 1)
        return all(gauge(g, "gateway_breaker_rejection_probability") == 0 for g in gateways)

    # The window's failures slide out within WINDOW; 3 s more for the fleet's counts to follow.
    wait_until_sync(stopped, timeout=WINDOW + 3, interval=0.05, message="shedding to stop")
    print(f"shedding stopped {time.monotonic() - healed:.1f} s after the upstream healed")
    assert shed_share(gateways, "/discovery/status/200", 20) == [0.0, 0.0, 0.0]
