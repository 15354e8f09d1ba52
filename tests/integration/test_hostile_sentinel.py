"""Sentinel failover: transitions follow the new master at once, also when the old one stays up."""

from __future__ import annotations

import json

import pytest
import redis

from gateway_breaker import CircuitBreakerManager, CircuitState, Config
from tests.conftest import RedisSentinelServers
from tests.helpers import wait_until, wait_until_sync
from tests.integration.conftest import managers  # noqa: F401  (fixture)

pytestmark = pytest.mark.redis


def boom() -> None:
    raise RuntimeError("upstream failed")


async def open_breaker(manager: CircuitBreakerManager, service: str) -> None:
    while manager.get(service).state is not CircuitState.OPEN:
        with pytest.raises(RuntimeError):
            await manager.call(service, boom)


def stored_state(client: redis.Redis, key: str) -> str | None:
    try:
        raw = client.get(key)
    except redis.RedisError:
        return None
    return None if raw is None else str(json.loads(raw)["state"])


async def test_a_manual_failover_moves_transitions_to_the_new_master_at_once(
    redis_sentinel: RedisSentinelServers,
    key_prefix: str,
    managers: list[CircuitBreakerManager],  # noqa: F811
) -> None:
    config = Config(
        redis={"url": redis_sentinel.url, "key_prefix": key_prefix},
        circuit_breaker={"services": {s: {"failure_threshold": 2} for s in ("a", "b", "c")}},
    )
    first = await CircuitBreakerManager.with_redis(config)
    second = await CircuitBreakerManager.with_redis(config)
    managers += [first, second]
    await open_breaker(first, "a")
    await wait_until(lambda: second.get("a").state is CircuitState.OPEN, timeout=3)

    sentinel = redis.Redis(port=redis_sentinel.sentinel.port)
    old = tuple(sentinel.sentinel_get_master_addr_by_name(redis_sentinel.service))

    def failover_started() -> bool:
        # Refused (NOGOODSLAVE) until the sentinel has found the replica, which takes a while.
        try:
            sentinel.execute_command("SENTINEL", "FAILOVER", redis_sentinel.service)
        except redis.ResponseError:
            return False
        return True

    wait_until_sync(failover_started, timeout=30, interval=0.2, message="a failover started")

    def switched() -> bool:
        return tuple(sentinel.sentinel_get_master_addr_by_name(redis_sentinel.service)) != old

    wait_until_sync(switched, timeout=30, message="the sentinel naming a new master")
    host, port = sentinel.sentinel_get_master_addr_by_name(redis_sentinel.service)
    new_master = redis.Redis(host=host, port=int(port), socket_timeout=1)
    # The next transitions land on the new master, and reach the other instance, in about a
    # second: not once the old master is demoted.
    await open_breaker(first, "b")
    await wait_until(
        lambda: stored_state(new_master, f"{key_prefix}:b:state") == "open",
        timeout=2.5,
        message="the transition on the new master",
    )
    await wait_until(lambda: second.get("b").state is CircuitState.OPEN, timeout=2.5)
    await open_breaker(second, "c")
    await wait_until(lambda: first.get("c").state is CircuitState.OPEN, timeout=2.5)
    assert stored_state(new_master, f"{key_prefix}:c:state") == "open"
