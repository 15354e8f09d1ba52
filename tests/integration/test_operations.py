"""Operators' commands, history and the fleet view across managers on a real redis-server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway_breaker import CircuitBreakerManager, CircuitOpenError, Config
from tests.conftest import RedisServer
from tests.helpers import wait_until
from tests.integration.test_fleet import boom, open_breaker

pytestmark = pytest.mark.redis


def ops_config(url: str, key_prefix: str, interval: float = 3600) -> Config:
    return Config(
        redis={"url": url, "key_prefix": key_prefix, "sync_interval_seconds": interval},
        circuit_breaker={
            "services": {"discovery": {"failure_threshold": 3, "timeout_seconds": 5}, "sona": {}}
        },
    )


@pytest.fixture
async def fleet(redis_shared: RedisServer, key_prefix: str) -> AsyncIterator[Callable[..., Any]]:
    created: list[CircuitBreakerManager] = []

    async def start(n: int, interval: float = 3600) -> list[CircuitBreakerManager]:
        config = ops_config(redis_shared.url, key_prefix, interval)
        managers = [await CircuitBreakerManager.with_redis(config) for _ in range(n)]
        created.extend(managers)
        return managers

    yield start
    for manager in created:
        await manager.aclose()


async def rejects(manager: CircuitBreakerManager, service: str = "discovery") -> bool:
    try:
        await manager.call(service, lambda: "ok")
    except CircuitOpenError:
        return True
    return False


async def test_forced_open_reaches_the_fleet_and_later_instances(
    fleet: Any, redis_shared: RedisServer, key_prefix: str
) -> None:
    a, b, c = await fleet(3)
    await a.set_manual("discovery", "forced_open", reason="upstream migration")
    for other in (b, c):
        await wait_until(lambda m=other: m.view("discovery").state == "forced_open")
        assert await rejects(other)
    stored = json.loads(redis_shared.client().get(f"{key_prefix}:discovery:state") or "{}")
    assert stored["state"] == "open"  # seed readers see an open breaker
    assert stored["manual"]["mode"] == "forced_open"
    (late,) = await fleet(1)
    assert await rejects(late)
    manual = late.view("discovery").manual
    assert manual is not None
    assert manual.reason == "upstream migration"
    await b.clear_manual("discovery")
    for other in (a, c, late):
        await wait_until(lambda m=other: m.view("discovery").state == "closed")
        assert not await rejects(other)


async def test_a_timed_mode_ends_by_itself_everywhere(fleet: Any) -> None:
    a, b = await fleet(2, interval=0.1)
    await a.set_manual("discovery", "forced_open", seconds=0.5)
    await wait_until(lambda: b.view("discovery").state == "forced_open")
    for manager in (a, b):
        await wait_until(lambda m=manager: m.view("discovery").state == "closed", timeout=5)


@pytest.mark.parametrize("mode", ["disabled", "metrics_only"])
async def test_disabled_and_metrics_only_never_reject(
    fleet: Any, mode: str, redis_shared: RedisServer, key_prefix: str
) -> None:
    a, b = await fleet(2)
    await a.set_manual("discovery", mode)
    await wait_until(lambda: b.view("discovery").state == mode)
    for _ in range(5):
        with pytest.raises(RuntimeError):
            await b.call("discovery", boom)
    assert not await rejects(b)
    expected = "open" if mode == "metrics_only" else "closed"
    assert b.view("discovery").automatic_state == expected

    # Seed readers see the effective state: traffic flows, so "closed", whatever the automatic
    # state machine decided underneath (kept in `auto`).
    def stored() -> dict[str, Any]:
        doc = json.loads(redis_shared.client().get(f"{key_prefix}:discovery:state") or "{}")
        assert isinstance(doc, dict)
        return doc

    await wait_until(lambda: stored().get("auto", "closed") == expected, timeout=5)
    doc = stored()
    assert doc["state"] == "closed", doc
    assert doc["manual"]["mode"] == mode


async def test_reset_through_one_closes_the_breaker_on_all(fleet: Any) -> None:
    a, b, c = await fleet(3)
    await open_breaker(a)
    await wait_until(lambda: b.view("discovery").state == "open")
    await c.reset("discovery", reason="fixed")
    for manager in (a, b, c):
        await wait_until(lambda m=manager: m.view("discovery").state == "closed")
        assert m_failures(manager) == 0


def m_failures(manager: CircuitBreakerManager) -> int:
    return manager.view("discovery").failure_count


async def test_history_is_the_fleets_with_causes_and_reasons(fleet: Any) -> None:
    a, b = await fleet(2)
    await open_breaker(a)
    await wait_until(lambda: b.view("discovery").state == "open")
    await b.set_manual("discovery", "forced_open", reason="keep it shut")
    history = await b.history("discovery")
    assert [(e.to_state, e.cause, e.origin) for e in history] == [
        ("forced_open", "manual", "manual"),
        ("open", "failure_threshold", "local"),
    ]
    assert history[0].reason == "keep it shut"
    assert history[0].instance == b.instance_id
    assert history[1].instance == a.instance_id
    assert history[1].failure_count == 3
    assert history[0].version > history[1].version
    seen_by_a = await a.history("discovery")
    assert [(e.version, e.cause, e.instance) for e in seen_by_a] == [
        (e.version, e.cause, e.instance) for e in history
    ]
    assert abs(seen_by_a[0].at - history[0].at) < 0.05  # one clock, Redis's
    # The instance that adopted the transition saw it as a fleet event.
    assert b.transition_counts[("discovery", "closed", "open", "fleet")] == 1
    assert a.transition_counts[("discovery", "closed", "open", "local")] == 1


async def test_a_policy_change_applies_on_the_others(fleet: Any) -> None:
    a, b, c = await fleet(3)
    await a.set_policy("discovery", {"failure_threshold": 2})
    for manager in (b, c):
        await wait_until(lambda m=manager: m.view("discovery").policy.failure_threshold == 2)
    for _ in range(2):
        with pytest.raises(RuntimeError):
            await c.call("discovery", boom)
    assert c.view("discovery").state == "open"
    (late,) = await fleet(1)
    assert late.view("discovery").policy.failure_threshold == 2
    await b.clear_policy("discovery")
    for manager in (a, c, late):
        await wait_until(lambda m=manager: m.view("discovery").policy.failure_threshold == 3)
    history = await late.history("discovery")
    causes = [(e.cause, e.origin, e.instance) for e in history]
    assert causes[0] == ("policy", "manual", b.instance_id)
    assert ("policy", "manual", a.instance_id) in causes


async def test_the_fleet_view_lists_every_live_instance(fleet: Any) -> None:
    a, b, c = await fleet(3, interval=0.1)
    await open_breaker(a)

    async def all_listed() -> bool:
        view = await b.fleet()
        ids = {i.id for i in view.instances}
        agreed = all(i.breakers.get("discovery", ("", 0))[0] == "open" for i in view.instances)
        return {a.instance_id, b.instance_id, c.instance_id} <= ids and agreed

    await wait_until(all_listed, timeout=5)
    view = await c.fleet()
    assert view.store["discovery"][0] == "open"
    assert all(i.pid > 0 and i.host for i in view.instances)


async def test_a_command_with_redis_down_applies_here_says_so_and_is_written_on_return(
    redis_server: RedisServer, key_prefix: str
) -> None:
    from gateway_breaker import StoreError

    config = ops_config(redis_server.url, key_prefix, interval=0.1)
    manager = await CircuitBreakerManager.with_redis(config)
    try:
        redis_server.kill()
        await wait_until(lambda: manager.store_up is False, timeout=10, message="outage")
        with pytest.raises(StoreError):
            await manager.set_manual("discovery", "forced_open", reason="outage drill")
        assert manager.view("discovery").state == "forced_open"
        assert manager.store_errors
        # Redis returns (empty): the command is written then, and the fleet follows it.
        redis_server.start()
        client = redis_server.client()
        key = f"{key_prefix}:discovery:state"
        await wait_until(lambda: client.get(key) is not None, timeout=15, message="the write")
        doc = json.loads(client.get(key) or "{}")
        assert doc["state"] == "open"
        assert doc["manual"]["mode"] == "forced_open"
        assert doc["manual"]["reason"] == "outage drill"
        later = await CircuitBreakerManager.with_redis(config)
        try:
            assert later.view("discovery").state == "forced_open"
            assert await rejects(later)
        finally:
            await later.aclose()
    finally:
        await manager.aclose()


async def test_a_command_on_a_lagging_instance_still_wins(
    fleet: Any, redis_shared: RedisServer, key_prefix: str
) -> None:
    a, c = await fleet(2)
    # c's announcements are stopped, so it has not seen the opening when it is told to reset.
    for task in c._sync._tasks[1:]:
        task.cancel()
    await open_breaker(a)
    key = f"{key_prefix}:discovery:state"
    await wait_until(lambda: b'"open"' in (redis_shared.client().get(key) or b""))
    assert c.view("discovery").state == "closed"
    await c.reset("discovery", reason="fixed")
    stored = json.loads(redis_shared.client().get(key) or "{}")
    assert stored["state"] == "closed"
    await wait_until(lambda: a.view("discovery").state == "closed")
