"""The adaptive mode on the fleet's counts: managers on one real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway_breaker import CircuitBreakerManager, CircuitOpenError, Config
from tests.conftest import RedisServer
from tests.helpers import wait_until

pytestmark = pytest.mark.redis

ADAPTIVE = {"mode": "adaptive", "min_calls": 20, "failure_threshold": 1000, "window_seconds": 4}


def boom() -> None:
    raise RuntimeError("upstream failed")


async def call(manager: CircuitBreakerManager, failed: bool) -> str:
    """One call: `shed`, `failure` or `success`."""
    try:
        await manager.call("svc", boom if failed else (lambda: None))
    except CircuitOpenError:
        return "shed"
    except RuntimeError:
        return "failure"
    return "success"


@pytest.fixture
async def fleet(redis_shared: RedisServer, key_prefix: str) -> AsyncIterator[Callable[..., Any]]:
    created: list[CircuitBreakerManager] = []

    async def start(n: int, **policy: Any) -> list[CircuitBreakerManager]:
        config = Config(
            redis={"url": redis_shared.url, "key_prefix": key_prefix},
            circuit_breaker={"services": {"svc": {**ADAPTIVE, **policy}}},
        )
        managers = [await CircuitBreakerManager.with_redis(config) for _ in range(n)]
        created.extend(managers)
        return managers

    yield start
    for manager in created:
        await manager.aclose()


async def test_a_healthy_instance_sends_its_calls_and_sheds_on_the_fleets_counts(
    fleet: Any, redis_shared: RedisServer, key_prefix: str
) -> None:
    sick, healthy = await fleet(2)
    # The notice of the first failures is a pub/sub hint: both must be listening for it.
    channel = f"{key_prefix}:events"
    await wait_until(
        lambda: redis_shared.client().pubsub_numsub(channel)[0][1] == 2,
        timeout=10,
        message="both instances subscribed",
    )
    # `healthy` has calls and no failure of its own: today's fleet counting sends nothing.
    for _ in range(40):
        await call(healthy, failed=False)
    evidence = f"{key_prefix}:svc:evidence"
    assert not redis_shared.client().hexists(evidence, healthy.instance_id)
    for i in range(200):  # every call of `sick` fails (its own share: all)
        await call(sick, failed=True)
        await call(healthy, failed=False)
        if i % 20 == 0:
            await asyncio.sleep(0.06)  # let the flushes run

    # The notice brought `healthy`'s calls into the fleet's window; both weigh the same counts.
    await wait_until(
        lambda: redis_shared.client().hexists(evidence, healthy.instance_id),
        timeout=10,
        message="healthy's calls in the fleet's window",
    )
    await wait_until(
        lambda: (
            abs(
                sick.get("svc").rejection_probability() - healthy.get("svc").rejection_probability()
            )
            < 0.1
            and healthy.get("svc").rejection_probability() > 0.2
        ),
        timeout=10,
    )
    healthy_view = healthy.view("svc")
    assert healthy_view.window_failures == 0
    assert healthy_view.health < 0.9  # the fleet's health, not its own
    outcomes = [await call(healthy, failed=False) for _ in range(200)]
    assert 0.1 < outcomes.count("shed") / 200 < 0.8
    assert sick.get("svc").state.value == "closed"  # sheds, never opens on the error rate


async def test_nothing_is_sent_while_nothing_fails(
    fleet: Any, redis_shared: RedisServer, key_prefix: str
) -> None:
    managers = await fleet(3)
    for _ in range(50):
        for manager in managers:
            assert await call(manager, failed=False) == "success"
    await asyncio.sleep(0.2)  # longer than several flush intervals: no flush may come
    assert not redis_shared.client().exists(f"{key_prefix}:svc:evidence")


async def test_shedding_ends_after_the_upstream_heals(fleet: Any) -> None:
    a, b = await fleet(2)
    for i in range(120):
        await call(a, failed=i % 2 == 0)
        await call(b, failed=i % 2 == 1)
        if i % 20 == 0:
            await asyncio.sleep(0.06)  # pacing: let the flushes run
    await wait_until(lambda: a.get("svc").rejection_probability() > 0.2, timeout=10)

    async def healed() -> bool:
        await call(a, failed=False)
        await call(b, failed=False)
        return all(m.get("svc").rejection_probability() == 0 for m in (a, b))

    # Within the window (4 s) plus a generous margin for a busy machine.
    await wait_until(healed, timeout=4 + 6, interval=0.02, message="shedding to end")
