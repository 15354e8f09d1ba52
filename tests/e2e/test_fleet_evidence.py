"""Fleet evidence between example gateways under uvicorn on one redis-server."""

from __future__ import annotations

import json
import time
from typing import Any

import port_for
import pytest

from tests.conftest import RedisServer
from tests.e2e.conftest import Gateway, StartGateway, Upstream, counts, make_config
from tests.helpers import wait_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


def evidence_config(upstream: Upstream, **discovery: Any) -> dict[str, Any]:
    """discovery: 12 consecutive failures open it, the error-rate rule is off."""
    policy = {"failure_threshold": 12, "min_calls": 1_000_000, "timeout_seconds": 30}
    config = make_config(upstream.url, **{**policy, **discovery})
    config["redis"] = {"sync_interval_seconds": 1}
    return config


def start(
    start_gateway: StartGateway,
    redis_server: RedisServer,
    config: dict[str, Any],
    n: int,
    env: dict[str, str] | None = None,
) -> list[Gateway]:
    gateways = [
        start_gateway(config, redis_url=redis_server.url, ready=False, env=env if i == 0 else None)
        for i in range(n)
    ]
    for gateway in gateways:
        gateway.wait_ready()
    for gateway in gateways:  # warm, on another service: discovery's counts stay clean
        assert gateway.get("/sona/status/200").status_code == 200
    wait_until_sync(
        lambda: _subscribers(redis_server) == n, timeout=10, message=f"{n} gateways subscribed"
    )
    return gateways


def _redis_now_ms(redis_server: RedisServer) -> int:
    seconds, micros = redis_server.client().time()
    return int(seconds) * 1000 + int(micros) // 1000


def _subscribers(redis_server: RedisServer) -> int:
    ((_, count),) = redis_server.client().pubsub_numsub("circuit_breaker:events")
    return int(count)


def test_three_gateways_open_together_on_the_fleets_count(
    redis_server: RedisServer, start_gateway: StartGateway, upstream: Upstream
) -> None:
    gateways = start(start_gateway, redis_server, evidence_config(upstream), 3)
    reached = counts(upstream)
    rejecting: set[int] = set()
    deadline = time.monotonic() + 30
    i = 0
    while len(rejecting) < 3:  # round robin until every gateway rejects
        assert time.monotonic() < deadline, f"{reached()} requests and still not all rejecting"
        status = gateways[i % 3].get("/discovery/status/500").status_code
        assert status in (500, 503)
        if status == 503:
            rejecting.add(i % 3)
        i += 1
    print(f"requests that reached the failing upstream: {reached()} (threshold 12)")
    # Counting alone, the first gateway opens after 12 failures of its own: 34 requests in this
    # round robin. The fleet's count opens after 12 in all, plus what the gateways send while
    # their counts are in flight (12-17 measured, benchmarks/fleet_evidence.py); 28 leaves a
    # loaded machine room and still tells the two apart.
    assert 12 <= reached() <= 28


def test_quorum_keeps_a_sick_gateway_from_opening_the_fleet(
    redis_server: RedisServer, start_gateway: StartGateway, upstream: Upstream
) -> None:
    dead = f"http://127.0.0.1:{port_for.select_random()}"  # nothing listens there
    env = {"CIRCUIT_BREAKER__SERVICES__DISCOVERY__UPSTREAM": dead}
    config = evidence_config(upstream, quorum=2)
    sick, healthy, other = start(start_gateway, redis_server, config, 3, env=env)
    statuses: dict[str, list[int]] = {"sick": [], "healthy": []}
    for _ in range(30):
        statuses["sick"].append(sick.get("/discovery/status/200").status_code)
        for gateway in (healthy, other):
            statuses["healthy"].append(gateway.get("/discovery/status/200").status_code)
    # The healthy two never refuse; the sick one stops sending to its dead upstream.
    assert set(statuses["healthy"]) == {200}, statuses
    assert statuses["sick"].count(502) == 12, statuses
    assert set(statuses["sick"][12:]) == {503}, statuses
    sick.wait_for_log("Circuit breaker opened for this instance only (service=discovery")
    # Then the upstream fails for everyone: the fleet opens on all three.
    for _ in range(30):
        for gateway in (healthy, other):
            if gateway.get("/discovery/status/500").status_code == 503:
                break
    for gateway in (sick, healthy, other):
        wait_until_sync(
            lambda g=gateway: g.get("/discovery/status/200").status_code == 503,
            timeout=5,
            message=f"{gateway.name} to reject",
        )
    doc = redis_server.client().get("circuit_breaker:discovery:state")
    assert doc is not None
    assert b'"state":"open"' in doc


def test_recovery_ramp_admits_few_at_first_on_both_gateways_then_all(
    redis_server: RedisServer, start_gateway: StartGateway, upstream: Upstream
) -> None:
    config = evidence_config(upstream, failure_threshold=2, timeout_seconds=1, recovery_seconds=4)
    a, b = start(start_gateway, redis_server, config, 2)
    for _ in range(2):
        assert a.get("/discovery/status/500").status_code == 500
    wait_until_sync(
        lambda: b.get("/discovery/status/200").status_code == 503, message="the fleet open"
    )
    # The open period ends; the first request probes and closes the breaker for the fleet.
    wait_until_sync(
        lambda: a.get("/discovery/status/200").status_code == 200,
        timeout=5,
        interval=0.05,
        message="the probe that closes it",
    )
    closed = time.monotonic()
    passed = {"a": 0, "b": 0}
    sent = {"a": 0, "b": 0}
    held_back = 0
    while time.monotonic() - closed < 1.0:  # the first second of the ramp
        for name, gateway in (("a", a), ("b", b)):
            response = gateway.get("/discovery/status/200")
            assert response.status_code in (200, 503)
            if response.status_code == 503:
                assert response.json()["state"] == "recovering", response.text
                assert response.headers["retry-after"] == "1"  # held back by the ramp
                assert response.headers["x-circuit-breaker"] == "recovering"
                held_back += 1
            sent[name] += 1
            passed[name] += response.status_code == 200
    print(f"first second of the ramp: passed {passed} of {sent}")
    assert held_back > 0, (passed, sent)
    for name in ("a", "b"):
        assert passed[name] <= sent[name] * 0.5, (passed, sent)
    # After the ramp (it ends recovery_seconds after the stored close, on Redis's clock; 50 ms
    # on top for each gateway's estimate of its offset from it), everything passes again.
    raw = redis_server.client().get("circuit_breaker:discovery:state")
    assert raw is not None
    ends_ms = json.loads(raw)["closed_at_ms"] + 4000 + 50
    wait_until_sync(
        lambda: _redis_now_ms(redis_server) >= ends_ms, timeout=10, message="the end of the ramp"
    )
    after = [g.get("/discovery/status/200").status_code for g in (a, b) for _ in range(20)]
    assert set(after) == {200}, (after, a.output()[-3000:])
