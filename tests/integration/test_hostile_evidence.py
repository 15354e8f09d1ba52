"""One rule for every stored value: a state value the codec rejects never silences fleet counting,
planted evidence never decides, and a stored time never holds traffic back longer than the
policy allows."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway_breaker import CircuitBreakerManager, CircuitOpenError, CircuitState, Config
from tests.conftest import RedisServer
from tests.helpers import wait_until

pytestmark = pytest.mark.redis


@pytest.fixture
async def start(redis_shared: RedisServer, key_prefix: str) -> AsyncIterator[Callable[..., Any]]:
    created: list[CircuitBreakerManager] = []

    async def make(n: int, **policy: Any) -> list[CircuitBreakerManager]:
        discovery = {"failure_threshold": 3, "timeout_seconds": 30, **policy}
        config = Config(
            redis={"url": redis_shared.url, "key_prefix": key_prefix, "sync_interval_seconds": 5},
            circuit_breaker={"services": {"discovery": discovery}},
        )
        managers = [await CircuitBreakerManager.with_redis(config) for _ in range(n)]
        created.extend(managers)
        return managers

    yield make
    for manager in created:
        await manager.aclose()


def boom() -> None:
    raise RuntimeError("upstream failed")


async def fail(manager: CircuitBreakerManager, times: int) -> None:
    for _ in range(times):
        with pytest.raises(RuntimeError):
            await manager.call("discovery", boom)


REJECTED = {
    "integral float version": '{"state":"closed","version":10.0}',
    "string version": '{"state":"closed","version":"7"}',
    "version 2**63": '{"state":"closed","version":9223372036854775808}',
    "negative count": '{"state":"closed","failure_count":-2,"version":3}',
    "bogus manual mode": '{"state":"closed","manual":{"mode":"bogus"},"version":3}',
    "NaN opened_at": '{"state":"open","opened_at":NaN,"version":3}',
}


@pytest.mark.parametrize("name", list(REJECTED))
async def test_a_rejected_state_value_never_stops_fleet_counting(
    start: Any, redis_shared: RedisServer, key_prefix: str, name: str
) -> None:
    redis_shared.client().set(f"{key_prefix}:discovery:state", REJECTED[name])
    a, b = await start(2)
    await fail(a, 2)
    await fail(b, 2)  # 4 failures over the fleet, 2 on each: only the fleet's count opens it
    for m in (a, b):
        await wait_until(
            lambda m=m: m.get("discovery").state is CircuitState.OPEN,
            timeout=5,
            message="the fleet's counts opening the breaker",
        )
    doc = json.loads(redis_shared.client().get(f"{key_prefix}:discovery:state") or b"null")
    assert doc["state"] == "open"
    assert not a.get("discovery").local


@pytest.mark.parametrize(
    "planted",
    [
        "99999999999999999999999999,1,1,{now}",  # a run no instance could have
        "2,2,2,{far}",  # from the future: it would never grow stale
        "2,2,2,99999999999999999999",
    ],
)
async def test_planted_evidence_never_opens_the_fleet(
    start: Any, redis_shared: RedisServer, key_prefix: str, planted: str
) -> None:
    (a,) = await start(1)
    now_ms = int(time.time() * 1000)
    value = planted.format(now=now_ms, far=now_ms + 3_600_000)
    redis_shared.client().hset(
        f"{key_prefix}:discovery:evidence", mapping={"evil": value, "_v": "0"}
    )
    await fail(a, 1)
    await wait_until(lambda: a._sync is not None and not a._sync._evidence, timeout=3)
    await fail(a, 1)
    await wait_until(lambda: a._sync is not None and not a._sync._evidence, timeout=3)
    assert a.get("discovery").state is CircuitState.CLOSED
    stored = redis_shared.client().get(f"{key_prefix}:discovery:state")
    assert stored is None or json.loads(stored)["state"] == "closed"


async def test_a_future_ramp_start_holds_traffic_back_no_longer_than_recovery_seconds(
    start: Any, redis_shared: RedisServer, key_prefix: str
) -> None:
    future_ms = int((time.time() + 3600) * 1000)
    redis_shared.client().set(
        f"{key_prefix}:discovery:state",
        json.dumps({"state": "closed", "version": 4, "closed_at_ms": future_ms}),
    )
    (a,) = await start(1, recovery_seconds=1)
    assert a.get("discovery").ramp_share() > 0 or a.get("discovery").ramping

    async def all_pass() -> bool:
        for _ in range(20):
            try:
                await a.call("discovery", lambda: "ok")
            except CircuitOpenError:
                return False
        return True

    # recovery_seconds is 1: a generous bound, far below the planted hour.
    await wait_until(all_pass, timeout=10, interval=0.1, message="the ramp to end")
    assert a._sync is not None
    assert a._sync.store.rejected.counts.get("future_time", 0) >= 1  # type: ignore[attr-defined]
