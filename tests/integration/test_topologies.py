"""The same breaker behaviour on plain Redis, Redis Sentinel and Redis Cluster (real servers)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from gateway_breaker import CircuitBreakerManager, CircuitOpenError, CircuitState, Config
from gateway_breaker.errors import ConfigError
from gateway_breaker.store.redis import RedisStateStore, RedisTopology
from tests.conftest import RedisClusterServers, RedisSentinelServers, RedisServer
from tests.helpers import wait_until
from tests.integration.conftest import probe_burst

pytestmark = pytest.mark.redis


@dataclass
class Topology:
    name: str
    url: str
    client: Callable[[], Any]  # a sync client that reads keys wherever they live
    key: Callable[[str, str], str]  # (key_prefix, service) -> state key


def plain_key(prefix: str, service: str) -> str:
    return f"{prefix}:{service}:state"


def cluster_key(prefix: str, service: str) -> str:
    return f"{prefix}:{{{service}}}:state"


@pytest.fixture(params=["plain", "sentinel", "cluster"])
def topology(request: pytest.FixtureRequest) -> Topology:
    if request.param == "plain":
        server: RedisServer = request.getfixturevalue("redis_shared")
        return Topology("plain", server.url, server.client, plain_key)
    if request.param == "sentinel":
        sentinel: RedisSentinelServers = request.getfixturevalue("redis_sentinel")
        return Topology("sentinel", sentinel.url, sentinel.master_client, plain_key)
    cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
    return Topology("cluster", cluster.url, cluster.client, cluster_key)


def config(url: str, key_prefix: str, **redis_settings: Any) -> Config:
    return Config(
        redis={"url": url, "key_prefix": key_prefix, **redis_settings},
        circuit_breaker={
            "services": {
                # Open long enough for the checks below, even with this test's blocking clients
                # holding up the event loop for a while on a loaded machine.
                "discovery": {"failure_threshold": 3, "timeout_seconds": 1.5},
                "sona": {"failure_threshold": 3, "timeout_seconds": 1.5},
                "auth": {"failure_threshold": 3, "timeout_seconds": 1.5},
            }
        },
    )


def boom() -> None:
    raise RuntimeError("upstream failed")


async def open_breaker(manager: CircuitBreakerManager, service: str) -> None:
    while manager.get(service).state is not CircuitState.OPEN:
        with pytest.raises(RuntimeError):
            await manager.call(service, boom)


def stored_state(topology: Topology, key_prefix: str, service: str) -> str | None:
    raw = topology.client().get(topology.key(key_prefix, service))
    return None if raw is None else str(json.loads(raw)["state"])


async def test_the_fleet_contract_holds_on_every_topology(
    topology: Topology, key_prefix: str, managers: list[CircuitBreakerManager]
) -> None:
    cfg = config(topology.url, key_prefix, sync_interval_seconds=3600)
    a = await CircuitBreakerManager.with_redis(cfg)
    b = await CircuitBreakerManager.with_redis(cfg)
    managers += [a, b]
    for service in ("discovery", "sona", "auth"):
        await open_breaker(a, service)
        # Persisted as the seed JSON (under a hash-tagged key on a cluster) with its TTL.
        await wait_until(lambda s=service: stored_state(topology, key_prefix, s) == "open")
        ttl = topology.client().ttl(topology.key(key_prefix, service))
        assert 3590 <= ttl <= 3600
        # Announced: the warm instance rejects without polling.
        await wait_until(lambda s=service: b.get(s).state is CircuitState.OPEN, timeout=3)
        with pytest.raises(CircuitOpenError):
            await b.call(service, lambda: "ok")
    # A third instance restores the open states at start.
    c = await CircuitBreakerManager.with_redis(cfg)
    managers.append(c)
    assert c.get("sona").state is CircuitState.OPEN
    # One probe for the fleet, then closed everywhere.
    await wait_until(lambda: a.get("auth").retry_after() == 0, timeout=3)
    await wait_until(lambda: b.get("auth").retry_after() == 0, timeout=3)
    probes, results = await probe_burst([a, b, c], "auth", 12)
    assert probes == 1
    assert results.count("ok") == 1
    for m in (a, b, c):
        await wait_until(lambda m=m: m.get("auth").state is CircuitState.CLOSED)
    await wait_until(lambda: stored_state(topology, key_prefix, "auth") == "closed")


async def test_sentinel_failover_during_traffic(
    redis_sentinel: RedisSentinelServers, key_prefix: str, managers: list[CircuitBreakerManager]
) -> None:
    manager = await CircuitBreakerManager.with_redis(config(redis_sentinel.url, key_prefix))
    managers.append(manager)
    await open_breaker(manager, "discovery")
    await wait_until(
        lambda: stored_state(_sentinel_topology(redis_sentinel), key_prefix, "discovery") == "open"
    )
    old_master = redis_sentinel.master.port
    results: list[str] = []

    async def traffic() -> None:
        results.append(await manager.call("sona", lambda: "ok"))
        await asyncio.sleep(0.001)  # pacing: light traffic, not waiting for anything

    redis_sentinel.master.kill()

    def promoted() -> bool:
        try:
            return redis_sentinel.master_client().connection_pool.connection_kwargs[
                "port"
            ] != old_master and bool(redis_sentinel.master_client().ping())
        except redis.RedisError:
            return False

    async def serve_until_promoted() -> bool:
        await traffic()
        return promoted()

    await wait_until(serve_until_promoted, timeout=30, interval=0.01, message="failover")
    assert set(results) == {"ok"}, "no call failed because of the failover"
    # The new master receives what changes next.
    await open_breaker(manager, "auth")
    await wait_until(
        lambda: stored_state(_sentinel_topology(redis_sentinel), key_prefix, "auth") == "open",
        timeout=20,
    )


def _sentinel_topology(servers: RedisSentinelServers) -> Topology:
    return Topology("sentinel", servers.url, servers.master_client, plain_key)


def test_urls_parse_into_topologies() -> None:
    sentinel = RedisTopology.parse("redis+sentinel://u:p%40ss@h1:26379,h2:26380/mymaster/2")
    assert sentinel.kind == "sentinel"
    assert sentinel.hosts == (("h1", 26379), ("h2", 26380))
    assert (sentinel.service_name, sentinel.db) == ("mymaster", 2)
    assert (sentinel.username, sentinel.password) == ("u", "p@ss")
    cluster = RedisTopology.parse("redis+cluster://h1:7000,h2:7001")
    assert cluster.kind == "cluster"
    assert cluster.hosts == (("h1", 7000), ("h2", 7001))
    assert RedisTopology.parse("rediss://h:6380/0").kind == "single"
    for bad in ("redis+sentinel://h1:1", "redis+cluster://h1:1/0", "redis+cluster://h1"):
        with pytest.raises(ConfigError, match=r"redis\.url"):
            RedisTopology.parse(bad)


def test_cluster_keys_share_a_slot_and_plain_keys_keep_the_seed_name() -> None:
    plain = RedisStateStore(Config(redis={"url": "redis://h:1"}).redis)
    assert plain.key("discovery") == "circuit_breaker:discovery:state"
    cluster = RedisStateStore(Config(redis={"url": "redis+cluster://h:1"}).redis)
    assert cluster.key("discovery") == "circuit_breaker:{discovery}:state"
    assert cluster.key("discovery", "probe") == "circuit_breaker:{discovery}:probe"
