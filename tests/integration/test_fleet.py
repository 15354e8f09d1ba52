"""Several managers on one real redis-server behave as one breaker."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway_breaker import CircuitBreakerManager, CircuitOpenError, CircuitState, Config
from tests.conftest import RedisServer
from tests.helpers import wait_until
from tests.integration.conftest import probe_burst

pytestmark = pytest.mark.redis


def fleet_config(url: str, key_prefix: str, **policy: Any) -> Config:
    discovery = {"failure_threshold": 3, "timeout_seconds": 5, **policy}
    return Config(
        # A long re-read interval: what propagates here propagates by announcement.
        redis={"url": url, "key_prefix": key_prefix, "sync_interval_seconds": 3600},
        circuit_breaker={"services": {"discovery": discovery, "sona": {}, "auth": {}}},
    )


def boom() -> None:
    raise RuntimeError("upstream failed")


async def open_breaker(manager: CircuitBreakerManager, service: str = "discovery") -> None:
    while manager.get(service).state is not CircuitState.OPEN:
        with pytest.raises(RuntimeError):
            await manager.call(service, boom)


@pytest.fixture
async def fleet(redis_shared: RedisServer, key_prefix: str) -> AsyncIterator[Callable[..., Any]]:
    created: list[CircuitBreakerManager] = []

    async def start(n: int, **kwargs: Any) -> list[CircuitBreakerManager]:
        clocks = kwargs.pop("clocks", [None] * n)
        config = fleet_config(redis_shared.url, key_prefix, **kwargs)
        managers = [await CircuitBreakerManager.with_redis(config, clock=clock) for clock in clocks]
        created.extend(managers)
        return managers

    yield start
    for manager in created:
        await manager.aclose()


async def test_a_transition_reaches_warm_instances_by_announcement(fleet: Any) -> None:
    a, b, c = await fleet(3)
    for service in ("discovery", "sona", "auth"):
        assert b.get(service).state is CircuitState.CLOSED
        await open_breaker(a, service)
        await wait_until(
            lambda s=service: (
                b.get(s).state is CircuitState.OPEN and c.get(s).state is CircuitState.OPEN
            ),
            timeout=2,
            message=f"{service} open everywhere",
        )
        with pytest.raises(CircuitOpenError):
            await b.call(service, lambda: "ok")


async def test_open_period_is_timed_on_one_clock_despite_skew(fleet: Any) -> None:
    skewed = [time.time, lambda: time.time() + 120.0, lambda: time.time() - 45.0]
    a, b, c = await fleet(3, clocks=skewed)
    await open_breaker(a)
    for manager in (b, c):
        await wait_until(lambda m=manager: m.get("discovery").state is CircuitState.OPEN)
        # Five seconds left on every instance, not 5 +/- the skew (the offset to Redis's clock
        # is measured to within half a round trip, so a loaded machine adds milliseconds).
        assert 3.5 < manager.get("discovery").retry_after() <= 5.05


async def test_concurrent_opposing_transitions_converge_on_one(fleet: Any) -> None:
    a, b = await fleet(2, timeout_seconds=0.05, half_open_max_calls=1)
    await open_breaker(a)
    await wait_until(lambda: b.get("discovery").state is CircuitState.OPEN)
    # Both see the period end: both go half-open and each lets a local probe run.
    await wait_until(lambda: a.get("discovery").retry_after() == 0)
    await wait_until(lambda: b.get("discovery").retry_after() == 0)
    pa, pb = a.get("discovery").acquire(), b.get("discovery").acquire()
    assert pa is not None
    assert pb is not None
    # Opposite outcomes at the same moment: one closes, the other reopens.
    a.get("discovery").record(pa, failed=False)
    b.get("discovery").record(pb, failed=True)

    def agreed() -> bool:
        sa, sb = a.get("discovery"), b.get("discovery")
        return sa.version == sb.version and sa.state is sb.state

    await wait_until(agreed, message="both instances on one state and version")


async def test_one_probe_for_the_whole_fleet(fleet: Any) -> None:
    managers = await fleet(3, timeout_seconds=0.2, half_open_max_calls=1)
    await open_breaker(managers[0])
    for m in managers:
        await wait_until(lambda m=m: m.get("discovery").state is CircuitState.OPEN)
        await wait_until(lambda m=m: m.get("discovery").retry_after() == 0, timeout=2)

    probes, results = await probe_burst(managers, "discovery", 24)
    assert probes == 1
    assert results.count("ok") == 1
    for m in managers:
        await wait_until(lambda m=m: m.get("discovery").state is CircuitState.CLOSED)


async def test_a_prober_that_dies_frees_its_slot_when_the_lease_runs_out(
    fleet: Any, redis_shared: RedisServer, key_prefix: str
) -> None:
    # The lease outlasts the steps between taking it and B's refused call on a busy machine.
    a, b = await fleet(2, timeout_seconds=0.1, probe_lease_seconds=3)
    await open_breaker(a)
    await wait_until(lambda: b.get("discovery").state is CircuitState.OPEN)
    await wait_until(lambda: a.get("discovery").retry_after() == 0)
    # A takes the fleet's probe slot and dies without a word: its process is gone.
    breaker = a.get("discovery")
    permit = breaker.acquire()
    assert permit is not None
    assert await a.lease_probe(breaker, permit)
    a._sync._tasks[0].cancel()  # type: ignore[union-attr]  # nothing will give the lease back
    await wait_until(lambda: b.get("discovery").retry_after() == 0)
    with pytest.raises(CircuitOpenError):
        await b.call("discovery", lambda: "ok")  # A's lease still holds

    # Once the lease runs out, B probes and closes the breaker.
    async def probe_passes() -> bool:
        try:
            return await b.call("discovery", lambda: "ok") == "ok"
        except CircuitOpenError:
            return False

    await wait_until(probe_passes, timeout=10, interval=0.05)
    assert b.get("discovery").state is CircuitState.CLOSED
    # Closing starts afresh: the written transition clears the probe slots.
    probe_key = f"{key_prefix}:discovery:probe"
    await wait_until(lambda: redis_shared.client().exists(probe_key) == 0)


async def test_an_instance_cut_off_from_announcements_still_converges(
    fleet: Any, redis_shared: RedisServer
) -> None:
    a, b = await fleet(2)
    client = redis_shared.client()
    # Drop every subscriber connection: whatever is announced meanwhile is lost to them.
    client.client_kill_filter(_type="pubsub")
    await open_breaker(a)
    await wait_until(lambda: b.get("discovery").state is CircuitState.OPEN, timeout=5)


async def test_backoff_grows_the_open_period_on_each_failed_probe(fleet: Any) -> None:
    (a,) = await fleet(1, timeout_seconds=0.05, max_timeout_seconds=0.4)
    await open_breaker(a)
    periods = []
    for _ in range(4):
        breaker = a.get("discovery")
        periods.append(breaker.open_seconds)
        await wait_until(lambda: a.get("discovery").retry_after() == 0, timeout=2)
        with pytest.raises(RuntimeError):
            await a.call("discovery", boom)
    assert periods[0] == pytest.approx(0.05)
    assert all(0.05 <= p <= 0.4 for p in periods)
    assert periods[2] > periods[0]
