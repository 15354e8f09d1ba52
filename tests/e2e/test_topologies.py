"""Example gateways on Redis Sentinel and Redis Cluster pass the plain-Redis walk-through."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import RedisClusterServers, RedisSentinelServers
from tests.e2e.conftest import StartGateway, Upstream, counts, make_config
from tests.helpers import wait_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


@pytest.fixture(params=["sentinel", "cluster"])
def topology(request: pytest.FixtureRequest) -> tuple[str, Callable[[], Any], str]:
    """(URL, a sync client that reads the state key, the state key of `discovery`)."""
    if request.param == "sentinel":
        sentinel: RedisSentinelServers = request.getfixturevalue("redis_sentinel")
        return sentinel.url, sentinel.master_client, "circuit_breaker:discovery:state"
    cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
    # On a cluster the service's keys carry a hash tag; the default key prefix is kept.
    return cluster.url, cluster.client, "circuit_breaker:{discovery}:state"


def stored_state(client: Callable[[], Any], key: str) -> str | None:
    raw = client().get(key)
    return None if raw is None else str(json.loads(raw)["state"])


def test_open_reject_elsewhere_probe_and_close(
    topology: tuple[str, Callable[[], Any], str],
    start_gateway: StartGateway,
    upstream: Upstream,
) -> None:
    url, client, key = topology
    client().delete(key)  # the cluster lives for the session
    # Open long enough that B's checks below fall inside the open period on a busy machine.
    config = make_config(upstream.url, failure_threshold=3, timeout_seconds=5)
    a = start_gateway(config, redis_url=url)
    b = start_gateway(config, redis_url=url)
    assert b.get("/discovery/status/200").status_code == 200

    for _ in range(3):
        assert a.get("/discovery/status/500").status_code == 500
    assert a.get("/discovery/items").status_code == 503
    wait_until_sync(lambda: stored_state(client, key) == "open", message="open in Redis")
    # B learns of it and rejects without calling the upstream.
    wait_until_sync(lambda: b.get("/discovery/items").status_code == 503, timeout=3)
    reached = counts(upstream)
    response = b.get("/discovery/items")
    assert response.status_code == 503
    assert response.json()["service"] == "discovery"
    assert reached() == 0

    # After the open period one probe passes through B and closes the breaker everywhere.
    wait_until_sync(lambda: b.get("/discovery/items").status_code == 200, timeout=15)
    wait_until_sync(lambda: stored_state(client, key) == "closed", message="closed in Redis")
    wait_until_sync(lambda: a.get("/discovery/items").status_code == 200, timeout=3)
