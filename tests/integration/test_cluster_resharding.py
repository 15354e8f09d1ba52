"""A Cluster resharding: a service's slot moves to another node while instances track it.

The instances' tracked reads on the old node answer MOVED; they read the slot map again, open
their node connections afresh and re-read every service: every instance agrees with Redis
again within seconds, and values written past the gateways on the new node reach them.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from gateway_breaker import CircuitBreakerManager, CircuitState
from tests.conftest import RedisClusterServers
from tests.helpers import wait_until
from tests.integration.test_scale import scale_config, seed_state, tracking

pytestmark = pytest.mark.redis

# The bound is 2 s after a resharding; the margin is for a busy 2-core machine.
AGREE_SECONDS = 10.0


def move_slot(cluster: RedisClusterServers, key: str) -> None:
    """Move `key`'s slot, with its keys, to another master (as `redis-cli --cluster
    reshard` does, one slot)."""
    nodes = {n.port: redis.Redis(port=n.port) for n in cluster.nodes}
    ids = {
        port: client.execute_command("CLUSTER", "MYID").decode() for port, client in nodes.items()
    }
    slot = next(iter(nodes.values())).execute_command("CLUSTER", "KEYSLOT", key)
    source = next(p for p, c in nodes.items() if _owns(c, slot))
    target = next(p for p in nodes if p != source)
    nodes[target].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
    nodes[source].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
    keys = nodes[source].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
    if keys:
        nodes[source].execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
    for client in nodes.values():
        client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])


def _owns(client: redis.Redis, slot: int) -> bool:
    me = client.execute_command("CLUSTER", "MYID").decode()
    for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
        if start <= slot <= end:
            node_id = master[2].decode() if len(master) > 2 else ""
            return node_id == me
    return False


async def test_after_a_resharding_the_instances_agree_with_redis_again(
    redis_cluster: RedisClusterServers, key_prefix: str
) -> None:
    config = scale_config(redis_cluster.url, key_prefix, 500)
    a = await CircuitBreakerManager.with_redis(config)
    b = await CircuitBreakerManager.with_redis(config)
    managers: list[Any] = [a, b]
    try:
        for m in managers:
            await wait_until(lambda m=m: tracking(m), 10, 0.05, "client tracking on every node")
        key = f"{key_prefix}:{{svc42}}:state"
        client = redis_cluster.client()
        client.set(key, seed_state("open", version=3), ex=3600)
        for m in managers:
            await wait_until(lambda m=m: m.get("svc42").version == 3, AGREE_SECONDS, 0.01, "v3")
        move_slot(redis_cluster, key)
        # Written on the slot's new node, past the gateways.
        redis_cluster.client().set(key, seed_state("open", version=8), ex=3600)
        started = time.monotonic()
        for m in managers:
            await wait_until(
                lambda m=m: m.get("svc42").version == 8,
                AGREE_SECONDS,
                0.01,
                "the value on the new node to reach the instance",
            )
        print(f"agreed {time.monotonic() - started:.2f}s after the resharding")
        # Tracking works again on the new map: the next change is reported too.
        for m in managers:
            await wait_until(lambda m=m: tracking(m), AGREE_SECONDS, 0.05, "tracking again")
        redis_cluster.client().delete(key)
        for m in managers:
            await wait_until(
                lambda m=m: m.get("svc42").state is CircuitState.CLOSED,
                AGREE_SECONDS,
                0.01,
                "the DEL on the new node to reach the instance",
            )
        # A transition through the package still reaches the other instance.
        await a.set_manual("svc42", "forced_open", reason="after resharding")
        await wait_until(
            lambda: b.get("svc42").effective_state == "forced_open", AGREE_SECONDS, 0.01
        )
        assert a.store_up
        assert b.store_up
    finally:
        for m in managers:
            await m.aclose()
