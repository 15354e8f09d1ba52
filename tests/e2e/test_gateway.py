"""The example gateway end to end: real uvicorn processes, a real upstream, a real redis-server."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import port_for
import pytest

from tests.conftest import RedisServer
from tests.e2e.conftest import Gateway, StartGateway, Upstream, counts, make_config
from tests.helpers import wait_until_sync

pytestmark = pytest.mark.e2e

STATE_KEY = "circuit_breaker:discovery:state"


def fail_discovery(gateway: Gateway, times: int = 3, status: int = 500) -> None:
    """`times` upstream failures through the gateway, each answered by the upstream."""
    for _ in range(times):
        assert gateway.get(f"/discovery/status/{status}").status_code == status


def open_discovery(gateway: Gateway) -> None:
    """Three upstream failures, then wait until the gateway logged the breaker opening.

    Tests of other contracts wait on the log line so that they do not depend on the outcome of
    the third call being recorded before its response reaches the client; that ordering is
    checked by its own tests.
    """
    fail_discovery(gateway, 3)
    gateway.wait_for_log("(service=discovery, from=closed, to=open")


def assert_open_rejection(response: httpx.Response, service: str, max_retry_after: int) -> None:
    assert response.status_code == 503, response.text
    assert 1 <= int(response.headers["retry-after"]) <= max_retry_after
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == 503
    assert body["service"] == service
    assert body["state"] == "open"


def stored(redis_server: RedisServer, key: str = STATE_KEY) -> dict[str, Any] | None:
    raw = redis_server.client().get(key)
    if raw is None:
        return None
    doc = json.loads(raw)
    assert isinstance(doc, dict)
    return doc


def stored_state(redis_server: RedisServer) -> str | None:
    doc = stored(redis_server)
    return None if doc is None else doc["state"]


def closed_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused at once."""
    return port_for.select_random()


# -- in memory ---------------------------------------------------------------------------------


def test_breaker_opens_rejects_without_upstream_and_closes_after_probe(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    gateway = start_gateway()  # discovery: failure_threshold 3, timeout_seconds 1
    served = counts(upstream)

    # 4xx are successes: they never open the breaker.
    for _ in range(4):
        assert gateway.get("/discovery/status/404").status_code == 404
    fail_discovery(gateway, 3)
    assert served() == 7

    rejected = gateway.get("/discovery/anything")
    assert_open_rejection(rejected, "discovery", max_retry_after=2)
    assert served() == 7, "an open breaker must not call the upstream"

    # Other services, and prefixes that only look alike, are not affected.
    sona = gateway.get("/sona/anything")
    assert sona.status_code == 200
    assert sona.json()["path"] == "/sona/anything"
    unmatched = gateway.get("/discoveryx/anything")
    assert unmatched.status_code == 404
    assert served() == 8

    # After the open period one probe goes through; its success closes the breaker.
    wait_until_sync(
        lambda: gateway.get("/discovery/status/200").status_code == 200,
        timeout=5,
        interval=0.05,
        message="the probe after the open period",
    )
    for _ in range(5):
        assert gateway.get("/discovery/anything").status_code == 200
    gateway.wait_for_log("from=half_open, to=closed")
    assert "from=closed, to=open" in gateway.output()


def test_outcome_is_recorded_before_the_client_sees_the_response(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """A client that got the response which opened (or closed) the breaker sees the new state.

    The next request on the same connection must already be rejected after the failure that
    opened the breaker, and let through after the probe that closed it. Repeated, because the
    gateway streams its responses and a late record loses the race only some of the time.
    """
    open_period = 1.0
    config = make_config(upstream.url, failure_threshold=1, timeout_seconds=open_period)
    gateway = start_gateway(config)
    late_open = late_close = 0
    for _ in range(10):
        assert gateway.get("/discovery/status/500").status_code == 500
        answered = time.monotonic()
        let_through = gateway.get("/discovery/anything").status_code != 503
        # Let through after the open period is a probe, not a late record: a busy machine may
        # take that long between two requests. Within it, the breaker must already be open.
        if let_through and time.monotonic() - answered < open_period * 0.9:
            late_open += 1
        wait_until_sync(
            lambda: gateway.get("/discovery/status/200").status_code == 200,
            timeout=5,
            interval=0.02,
            message="a successful probe",
        )
        if gateway.get("/discovery/anything").status_code != 200:
            late_close += 1
        # Whatever happened above, start the next round from a closed breaker.
        wait_until_sync(
            lambda: gateway.get("/discovery/status/200").status_code == 200,
            timeout=5,
            interval=0.02,
            message="a closed breaker",
        )
    assert (late_open, late_close) == (0, 0), (
        f"of 10 rounds, {late_open} let a request through right after the breaker opened and"
        f" {late_close} rejected one right after it closed"
    )


def test_proxy_forwards_method_path_query_body_and_end_to_end_headers(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    gateway = start_gateway()
    body = b"x" * (1024 * 1024 + 7)

    def chunks() -> Any:
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    response = gateway.request(
        "POST",
        "/auth/login/../token%20x",
        params={"a": "1", "b": "two words"},
        content=chunks(),  # chunked: no content-length from the client
        headers={
            "x-request-id": "abc",
            "proxy-authorization": "Basic c2VjcmV0",
            "x-hop": "drop-me",
            "connection": "x-hop",
        },
    )
    assert response.status_code == 200, response.text
    echo = response.json()
    assert echo["method"] == "POST"
    assert echo["path"] == "/auth/token x"  # the client normalised `..`
    assert echo["query"] == "a=1&b=two+words"
    assert echo["body_bytes"] == len(body)
    headers = echo["headers"]
    assert headers["x-request-id"] == "abc"
    assert headers["host"] == f"127.0.0.1:{upstream.port}"
    assert "proxy-authorization" not in headers
    assert "x-hop" not in headers, "headers named by Connection are hop-by-hop"
    assert headers["x-forwarded-for"] == "127.0.0.1"

    # Healthz is the gateway's own; paths under no service are 404 from the gateway.
    assert gateway.get("/healthz").json() == {"status": "ok"}
    assert gateway.get("/elsewhere").status_code == 404


def test_upstream_down_is_502_and_opens_breaker_upstream_timeout_is_504(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    config = make_config(upstream.url, upstream=f"http://127.0.0.1:{closed_port()}/discovery")
    config["circuit_breaker"]["services"]["sona"]["failure_threshold"] = 1
    gateway = start_gateway(config, env={"UPSTREAM_TIMEOUT": "0.3"})

    for _ in range(3):
        response = gateway.get("/discovery/anything")
        assert response.status_code == 502, response.text
        assert response.json()["service"] == "discovery"
    gateway.wait_for_log("(service=discovery, from=closed, to=open")
    assert_open_rejection(gateway.get("/discovery/anything"), "discovery", max_retry_after=2)

    served = counts(upstream)
    slow = gateway.get("/sona/slow/2")
    assert slow.status_code == 504, slow.text
    assert slow.json()["service"] == "sona"
    assert served() == 1
    # sona opens after one failure: the 504 counted as one.
    gateway.wait_for_log("(service=sona, from=closed, to=open")
    assert_open_rejection(gateway.get("/sona/anything"), "sona", max_retry_after=10)
    assert served() == 1


def test_invalid_config_stops_the_gateway_naming_the_field(
    start_gateway: StartGateway, upstream: Upstream, tmp_path: Path
) -> None:
    config = make_config(upstream.url, error_rate_threshold=1.5)
    gateway = start_gateway(config, ready=False)
    assert gateway.wait_exit() != 0
    assert "circuit_breaker.services.discovery.error_rate_threshold" in gateway.output()

    missing = tmp_path / "no-such-dir" / "gateway.yaml"
    gateway = start_gateway(missing, ready=False)
    assert gateway.wait_exit() != 0
    assert str(missing) in gateway.output()


def test_example_config_serves_the_in_process_demo_upstream(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    gateway = start_gateway(example_config=True)  # examples/config.yaml, no other process
    served = counts(upstream)
    echo = gateway.get("/sona/anything", params={"q": "1"})
    assert echo.status_code == 200
    assert echo.json()["path"] == "/sona/anything"
    assert echo.json()["headers"]["host"] == "demo-upstream"
    open_discovery(gateway)
    assert_open_rejection(gateway.get("/discovery/anything"), "discovery", max_retry_after=5)
    assert served() == 0, "the example config must not need the network"


def test_disabled_breakers_let_every_failure_through_and_open_no_redis_connection(
    redis_server: RedisServer, start_gateway: StartGateway, upstream: Upstream
) -> None:
    gateway = start_gateway(redis_url=redis_server.url, env={"CIRCUIT_BREAKER_ENABLED": "false"})
    served = counts(upstream)
    for _ in range(6):
        assert gateway.get("/discovery/status/500").status_code == 500
    assert served() == 6
    assert gateway.get("/discovery/anything").status_code == 200
    clients = redis_server.client().client_list()
    assert not [c for c in clients if c.get("name") == "gateway-breaker"]
    assert redis_server.client().keys("*") == []


# -- with Redis --------------------------------------------------------------------------------


def test_open_state_is_shared_through_redis_and_closed_by_a_probe(
    redis_server: RedisServer, start_gateway: StartGateway, upstream: Upstream
) -> None:
    # (redis_server comes first so that the gateways stop, and flush, before it does.)
    # Open long enough for a second gateway to start inside the open period, however long a
    # busy machine takes to start one (5 s and more seen at a load average of 10).
    config = make_config(upstream.url, timeout_seconds=15)
    a = start_gateway(config, redis_url=redis_server.url)
    a.wait_for_log("Circuit breaker Redis persistence enabled")
    open_discovery(a)
    assert a.get("/discovery/anything").status_code == 503

    wait_until_sync(
        lambda: stored_state(redis_server) == "open", timeout=5, message="open state in Redis"
    )
    doc = stored(redis_server)
    assert doc is not None
    assert isinstance(doc["failure_count"], int)
    assert doc["failure_count"] >= 3
    assert isinstance(doc["success_count"], int)
    assert isinstance(doc["opened_at"], int)
    assert isinstance(doc["last_failure_time"], int)
    assert doc["last_failure_time"] >= doc["opened_at"] > 1_700_000_000
    assert 3500 <= redis_server.client().ttl(STATE_KEY) <= 3600
    a.wait_for_log("Persisted circuit breaker state to Redis (service=discovery, state=open)")

    served = counts(upstream)
    b = start_gateway(config, redis_url=redis_server.url)
    assert_open_rejection(b.get("/discovery/anything"), "discovery", max_retry_after=15)
    assert served() == 0, "B must honour the fleet's open breaker without calling the upstream"
    b.wait_for_log("Restored circuit breaker state from Redis (service=discovery, state=open")

    # After the open period a successful probe through A closes the breaker for the fleet.
    wait_until_sync(
        lambda: a.get("/discovery/status/200").status_code == 200,
        timeout=25,
        interval=0.05,
        message="A's probe after the open period",
    )
    wait_until_sync(
        lambda: stored_state(redis_server) == "closed", timeout=5, message="closed state in Redis"
    )
    wait_until_sync(
        lambda: b.get("/discovery/anything").status_code == 200,
        timeout=5,
        interval=0.05,
        message="B to let discovery through again",
    )


def test_unreachable_redis_falls_back_to_memory_and_resyncs_when_it_returns(
    redis_server: RedisServer, start_gateway: StartGateway, upstream: Upstream
) -> None:
    redis_server.stop()
    gateway = start_gateway(redis_url=redis_server.url)
    gateway.wait_for_log("falling back to in-memory only")

    assert gateway.get("/sona/anything").status_code == 200
    open_discovery(gateway)
    assert_open_rejection(gateway.get("/discovery/anything"), "discovery", max_retry_after=2)

    redis_server.start()
    wait_until_sync(
        lambda: stored_state(redis_server) == "open",
        timeout=20,
        interval=0.1,
        message="the open state to reach Redis once it is back",
    )
