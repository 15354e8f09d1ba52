"""The fleet decides on the fleet's evidence: managers on one real redis-server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway_breaker import CircuitBreakerManager, CircuitOpenError, CircuitState, Config
from gateway_breaker.store.base import Evidence
from gateway_breaker.store.redis import RedisStateStore
from tests.conftest import RedisServer
from tests.helpers import wait_until

pytestmark = pytest.mark.redis

OPEN, CLOSED = CircuitState.OPEN, CircuitState.CLOSED


def evidence_config(url: str, key_prefix: str, interval: float = 1, **policy: Any) -> Config:
    discovery = {"failure_threshold": 12, "min_calls": 100_000, "timeout_seconds": 30, **policy}
    return Config(
        redis={"url": url, "key_prefix": key_prefix, "sync_interval_seconds": interval},
        # sona counts for the fleet whatever discovery does: its counts reaching Redis show that
        # an evidence flush happened.
        circuit_breaker={"services": {"discovery": discovery, "sona": {"failure_threshold": 50}}},
    )


def boom() -> None:
    raise RuntimeError("upstream failed")


async def fail(manager: CircuitBreakerManager, times: int = 1, service: str = "discovery") -> None:
    for _ in range(times):
        with pytest.raises(RuntimeError):
            await manager.call(service, boom)


def flushed(redis_server: RedisServer, key_prefix: str, *managers: CircuitBreakerManager) -> Any:
    """A condition: every manager's counts for sona are in Redis (an evidence flush ran)."""
    key = f"{key_prefix}:sona:evidence"
    return lambda: all(redis_server.client().hexists(key, m.instance_id) for m in managers)


async def ok(manager: CircuitBreakerManager) -> bool:
    """One successful call; False when the breaker rejected it."""
    try:
        await manager.call("discovery", lambda: "ok")
    except CircuitOpenError:
        return False
    return True


@pytest.fixture
async def fleet(redis_shared: RedisServer, key_prefix: str) -> AsyncIterator[Callable[..., Any]]:
    created: list[CircuitBreakerManager] = []

    async def start(n: int, **policy: Any) -> list[CircuitBreakerManager]:
        config = evidence_config(redis_shared.url, key_prefix, **policy)
        managers = [await CircuitBreakerManager.with_redis(config) for _ in range(n)]
        created.extend(managers)
        return managers

    yield start
    for manager in created:
        await manager.aclose()


def all_in(managers: list[CircuitBreakerManager], state: CircuitState) -> Callable[[], bool]:
    return lambda: all(m.get("discovery").state is state for m in managers)


async def test_three_instances_open_on_their_summed_failures(
    fleet: Any, redis_shared: RedisServer, key_prefix: str
) -> None:
    managers = await fleet(3)
    for manager in managers:
        await fail(manager, 4)  # 12 in all; no instance near 12 on its own
    await wait_until(all_in(managers, OPEN), timeout=5, message="the fleet to open")
    for manager in managers:
        assert not await ok(manager)
        assert not manager.view("discovery").local
    history = await managers[0].history("discovery")
    opened = [e for e in history if e.to_state == "open"]
    assert len(opened) == 1  # one decision, written once
    assert (opened[0].cause, opened[0].origin, opened[0].failure_count) == (
        "failure_threshold",
        "local",
        12,
    )
    # The evidence starts over with the next closed period.
    assert not redis_shared.client().exists(f"{key_prefix}:discovery:evidence")


async def test_error_rate_rule_counts_the_fleets_window(fleet: Any) -> None:
    managers = await fleet(2, failure_threshold=1000, min_calls=20, error_rate_threshold=0.5)
    for manager in managers:
        for _ in range(5):
            assert await ok(manager)
        await fail(manager, 5)  # 10 calls, 5 failures each: 20 and 10 over the fleet
        assert manager.get("discovery").state is CLOSED
    await wait_until(all_in(managers, OPEN), timeout=5, message="the fleet to open")
    assert managers[0].get("discovery").last_cause == "error_rate"


async def test_instance_counting_keeps_each_instance_alone(
    fleet: Any, redis_shared: RedisServer, key_prefix: str
) -> None:
    managers = await fleet(3, counting="instance")
    for manager in managers:
        await fail(manager, 11)
        await fail(manager, 1, "sona")
    await wait_until(flushed(redis_shared, key_prefix, *managers), message="a flush")
    assert all_in(managers, CLOSED)()
    assert not redis_shared.client().exists(f"{key_prefix}:discovery:evidence")


async def test_below_quorum_one_sick_instance_opens_for_itself_only(
    fleet: Any, redis_shared: RedisServer, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    sick, healthy, other = await fleet(3, quorum=2)
    caplog.set_level(logging.WARNING, logger="gateway_breaker")
    await fail(sick, 12)
    assert sick.get("discovery").state is OPEN
    assert sick.view("discovery").local
    assert "Circuit breaker opened for this instance only (service=discovery, quorum=2)" in (
        caplog.text
    )
    # Its counts reach Redis; the fleet stays closed and the others keep serving.
    evidence_key = f"{key_prefix}:discovery:evidence"
    await wait_until(
        lambda: redis_shared.client().hexists(evidence_key, sick.instance_id),
        message="the sick instance's counts in Redis",
    )
    assert redis_shared.client().get(f"{key_prefix}:discovery:state") is None
    for _ in range(20):
        assert await ok(healthy)
        assert await ok(other)
    assert not await ok(sick)
    # A second instance failing too makes a quorum: the fleet opens everywhere.
    await fail(healthy, 1)
    await wait_until(all_in([sick, healthy, other], OPEN), timeout=5, message="fleet open")
    assert not sick.view("discovery").local
    assert not await ok(other)


async def test_fewer_live_instances_than_quorum_need_all_of_them(fleet: Any) -> None:
    a, b = await fleet(2, quorum=5)
    await fail(a, 6)
    await fail(b, 6)
    await wait_until(all_in([a, b], OPEN), timeout=5, message="both live instances to open")
    assert not a.view("discovery").local
    assert not b.view("discovery").local


async def test_a_run_ended_by_a_success_leaves_the_fleets_count(
    fleet: Any, redis_shared: RedisServer, key_prefix: str
) -> None:
    a, b = await fleet(2)
    key = f"{key_prefix}:discovery:evidence"
    await fail(a, 8)
    await wait_until(lambda: redis_shared.client().hexists(key, a.instance_id), message="sent")
    assert await ok(a)  # its run is over: the fleet must not count those 8 any more

    def contribution() -> list[int]:
        raw = redis_shared.client().hget(key, a.instance_id)
        return [int(x) for x in (raw or b"-1,0,0,0").split(b",")]

    # Run 0 now; its window's 9 calls and 8 failures still count for the error rate.
    await wait_until(lambda: contribution()[:3] == [0, 9, 8], message="the run of 0 sent")
    await fail(b, 8)
    await wait_until(lambda: redis_shared.client().hexists(key, b.instance_id), message="sent")
    assert all_in([a, b], CLOSED)()  # 0 + 8 of 12: the decision at b's report kept it closed


async def test_recovery_ramp_runs_alike_on_two_instances(fleet: Any) -> None:
    a, b = await fleet(2, failure_threshold=2, timeout_seconds=0.2, recovery_seconds=4)
    await fail(a, 2)
    await wait_until(all_in([a, b], OPEN), message="open")
    await wait_until(lambda: a.get("discovery").retry_after() == 0, message="timeout over")
    assert await ok(a)  # the probe closes the fleet's breaker
    await wait_until(all_in([a, b], CLOSED), message="closed everywhere")
    ba, bb = a.get("discovery"), b.get("discovery")
    assert ba.closed_at is not None
    assert bb.closed_at is not None
    assert abs(ba.closed_at - bb.closed_at) < 0.05  # one start, on Redis's clock
    assert ba.ramping
    assert bb.ramping
    admitted = [sum([await ok(m) for _ in range(200)]) for m in (a, b)]
    assert all(n <= 100 for n in admitted), admitted  # early in the ramp: far below half
    await wait_until(lambda: not ba.ramping and not bb.ramping, timeout=10, message="ramp end")
    assert all([await ok(m) for m in (a, b) for _ in range(50)])


async def test_steady_traffic_sends_no_redis_command(
    fleet: Any, redis_shared: RedisServer, key_prefix: str
) -> None:
    # No periodic re-read within the test: any script call would be the requests' doing.
    a, b = await fleet(2, interval=3600)
    client = redis_shared.client()
    client.config_resetstat()
    for _ in range(1000):
        assert await ok(a)
        assert await ok(b)
    # One failure elsewhere: once its counts are in Redis, a flush has run after the traffic.
    await fail(a, 1, "sona")
    await wait_until(flushed(redis_shared, key_prefix, a), message="a flush")
    stats = client.info("commandstats")
    # Writes, evidence and probe leases are scripts; re-reads after subscribing are not. The
    # one script call is sona's.
    assert stats["cmdstat_evalsha"]["calls"] == 1, stats
    assert "cmdstat_eval" not in stats
    assert client.hgetall(f"{key_prefix}:discovery:evidence") == {}


async def test_redis_down_every_instance_counts_alone_and_says_so_once(
    redis_server: RedisServer, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway_breaker")
    config = evidence_config(redis_server.url, key_prefix, interval=0.1)
    managers = [await CircuitBreakerManager.with_redis(config) for _ in range(2)]
    try:
        for manager in managers:
            assert manager.get("discovery").fleet_counting
        redis_server.kill()
        await wait_until(
            lambda: all(m.store_up is False for m in managers), timeout=10, message="outage seen"
        )
        for manager in managers:
            assert not manager.get("discovery").fleet_counting
            await fail(manager, 11)
            assert manager.get("discovery").state is CLOSED
            await fail(manager, 1)
            assert manager.get("discovery").state is OPEN  # its own 12, as without Redis
        alone = "Circuit breakers count failures per instance while Redis is unreachable"
        assert caplog.text.count(alone) == 2  # once per instance
    finally:
        for manager in managers:
            await manager.aclose()


async def test_two_instances_reaching_the_threshold_at_once_open_once(
    redis_shared: RedisServer, key_prefix: str
) -> None:
    settings = evidence_config(redis_shared.url, key_prefix).redis
    stores = [RedisStateStore(settings) for _ in range(4)]
    try:
        for store in stores:
            await store.connect()

        def report(i: int, run: int) -> Evidence:
            return Evidence(f"i{i}", run, run, run, 0, 10.0, 12, 100_000, 0.5, 1)

        results = await asyncio.gather(
            *(s.report_evidence("discovery", report(i, 3)) for i, s in enumerate(stores))
        )
        outcomes = sorted(r.outcome for r in results)
        assert outcomes.count("opened") == 1  # the fourth 3 made 12; no one opened twice
        history = await stores[0].history("discovery", 10)
        assert [e.to_state for e in history] == ["open"]
        assert history[0].failure_count == 12
        opened = next(r for r in results if r.outcome == "opened")
        assert opened.stored is not None
        assert opened.stored.version == 1
    finally:
        for store in stores:
            await store.aclose()
