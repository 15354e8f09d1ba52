"""Persistence through a real redis-server: the seed's contract, restore, fallback, corruption."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import port_for
import pytest

from gateway_breaker import CircuitBreakerManager, CircuitOpenError, CircuitState, Config
from gateway_breaker.errors import ConfigError
from tests.conftest import RedisServer
from tests.helpers import FakeClock, wait_until

pytestmark = pytest.mark.redis

SERVICES = {"discovery": {"failure_threshold": 3, "timeout_seconds": 5}, "sona": {}}


def make_config(url: str, key_prefix: str = "circuit_breaker", **redis: Any) -> Config:
    return Config(
        redis={"url": url, "key_prefix": key_prefix, **redis},
        circuit_breaker={"services": SERVICES},
    )


def boom() -> None:
    raise RuntimeError("upstream failed")


async def fail(manager: CircuitBreakerManager, service: str, times: int) -> None:
    for _ in range(times):
        with pytest.raises((RuntimeError, CircuitOpenError)):
            await manager.call(service, boom)


def stored(server: RedisServer, key: str) -> dict[str, Any] | None:
    raw = server.client().get(key)
    try:
        doc = None if raw is None else json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def has_state(server: RedisServer, key: str, state: str) -> Callable[[], bool]:
    return lambda: stored_state(server, key)() == state


def stored_state(server: RedisServer, key: str) -> Callable[[], str | None]:
    def state() -> str | None:
        doc = stored(server, key)
        return None if doc is None else doc["state"]

    return state


async def test_every_transition_is_persisted_as_the_seed_json(
    redis_shared: RedisServer, key_prefix: str, managers: list[CircuitBreakerManager]
) -> None:
    clock = FakeClock()
    manager = await CircuitBreakerManager.with_redis(
        make_config(redis_shared.url, key_prefix), clock=clock
    )
    managers.append(manager)
    key = f"{key_prefix}:discovery:state"
    state = stored_state(redis_shared, key)

    await fail(manager, "discovery", 3)
    await wait_until(lambda: state() == "open", message="open persisted")
    doc = stored(redis_shared, key)
    assert doc is not None
    assert doc["failure_count"] == 3
    assert doc["success_count"] == 0
    # Times are stored on Redis's clock (the fleet's), whatever this instance's clock says.
    redis_now = redis_shared.client().time()[0]
    assert isinstance(doc["opened_at"], int)
    assert abs(doc["opened_at"] - redis_now) <= 2
    assert isinstance(doc["last_failure_time"], int)
    assert doc["last_failure_time"] == doc["opened_at"]
    assert 3590 <= redis_shared.client().ttl(key) <= 3600

    clock.advance(5)
    breaker = manager.get("discovery")
    permit = breaker.acquire()  # open -> half_open
    assert permit is not None
    await wait_until(lambda: state() == "half_open", message="half_open persisted")
    breaker.record(permit, failed=True)  # half_open -> open
    await wait_until(lambda: state() == "open", message="reopen persisted")

    clock.advance(5)
    assert await manager.call("discovery", lambda: "ok") == "ok"  # probe closes it
    await wait_until(lambda: state() == "closed", message="closed persisted")
    doc = stored(redis_shared, key)
    assert doc is not None
    assert (doc["failure_count"], doc["success_count"]) == (0, 0)
    assert doc["version"] == 5  # open, half_open, open, half_open, closed


async def test_ttl_is_set_on_every_write(
    redis_shared: RedisServer, key_prefix: str, managers: list[CircuitBreakerManager]
) -> None:
    manager = await CircuitBreakerManager.with_redis(
        make_config(redis_shared.url, key_prefix, state_ttl_seconds=120)
    )
    managers.append(manager)
    key = f"{key_prefix}:discovery:state"
    await fail(manager, "discovery", 3)
    await wait_until(lambda: stored(redis_shared, key) is not None)
    assert 110 <= redis_shared.client().ttl(key) <= 120


async def test_a_new_instance_restores_the_open_state_at_start(
    redis_shared: RedisServer,
    key_prefix: str,
    managers: list[CircuitBreakerManager],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(redis_shared.url, key_prefix)
    first = await CircuitBreakerManager.with_redis(config)
    managers.append(first)
    await fail(first, "discovery", 3)
    await wait_until(has_state(redis_shared, f"{key_prefix}:discovery:state", "open"))

    calls = 0

    def upstream() -> str:
        nonlocal calls
        calls += 1
        return "ok"

    with caplog.at_level(logging.DEBUG, logger="gateway_breaker"):
        second = await CircuitBreakerManager.with_redis(config)
        managers.append(second)
        assert second.get("discovery").state is CircuitState.OPEN
        with pytest.raises(CircuitOpenError) as raised:
            await second.call("discovery", upstream)
    assert calls == 0
    assert raised.value.service == "discovery"
    assert 0 < raised.value.retry_after <= 5
    assert "Restored circuit breaker state from Redis (service=discovery, state=open" in caplog.text


async def test_a_service_first_used_later_is_read_before_its_first_call(
    redis_shared: RedisServer, key_prefix: str, managers: list[CircuitBreakerManager]
) -> None:
    config = make_config(redis_shared.url, key_prefix)
    first = await CircuitBreakerManager.with_redis(config)
    second = await CircuitBreakerManager.with_redis(config)
    managers += [first, second]
    await fail(first, "unlisted", 5)  # not in the config: default policy, threshold 5
    await wait_until(has_state(redis_shared, f"{key_prefix}:unlisted:state", "open"))
    with pytest.raises(CircuitOpenError):
        await second.call("unlisted", lambda: "ok")


async def test_warm_instances_learn_of_each_others_transitions(
    redis_shared: RedisServer, key_prefix: str, managers: list[CircuitBreakerManager]
) -> None:
    config = make_config(redis_shared.url, key_prefix, sync_interval_seconds=0.05)
    first = await CircuitBreakerManager.with_redis(config)
    second = await CircuitBreakerManager.with_redis(config)
    managers += [first, second]
    assert second.get("discovery").state is CircuitState.CLOSED
    await fail(first, "discovery", 3)
    await wait_until(lambda: second.get("discovery").state is CircuitState.OPEN, timeout=3)


async def test_concurrent_transitions_never_lose_one_another(
    redis_shared: RedisServer, key_prefix: str, managers: list[CircuitBreakerManager]
) -> None:
    config = make_config(redis_shared.url, key_prefix, sync_interval_seconds=0.05)
    first = await CircuitBreakerManager.with_redis(config)
    second = await CircuitBreakerManager.with_redis(config)
    managers += [first, second]
    # Both open the same breaker at once: one write wins, the other adopts it.
    await asyncio.gather(fail(first, "discovery", 3), fail(second, "discovery", 3))
    key = f"{key_prefix}:discovery:state"

    def agreed() -> bool:
        doc = stored(redis_shared, key)
        return (
            doc is not None
            and first.get("discovery").version == doc["version"]
            and second.get("discovery").version == doc["version"]
        )

    await wait_until(agreed, message="both instances on the stored version")
    assert first.get("discovery").state is CircuitState.OPEN
    assert second.get("discovery").state is CircuitState.OPEN


async def test_unreachable_redis_falls_back_to_memory_then_catches_up(
    redis_server: RedisServer,
    key_prefix: str,
    managers: list[CircuitBreakerManager],
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="gateway_breaker"):
        manager = await CircuitBreakerManager.with_redis(make_config(redis_server.url, key_prefix))
        managers.append(manager)
    assert "falling back to in-memory only" in caplog.text

    assert await manager.call("discovery", lambda: "ok") == "ok"
    await fail(manager, "discovery", 3)
    with pytest.raises(CircuitOpenError):
        await manager.call("discovery", lambda: "ok")

    redis_server.start()
    key = f"{key_prefix}:discovery:state"
    await wait_until(lambda: stored_state(redis_server, key)() == "open", timeout=20)


async def test_killing_redis_under_traffic_fails_no_call_and_resyncs(
    redis_server: RedisServer,
    key_prefix: str,
    managers: list[CircuitBreakerManager],
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager = await CircuitBreakerManager.with_redis(make_config(redis_server.url, key_prefix))
    managers.append(manager)
    key = f"{key_prefix}:sona:state"
    results: list[str] = []

    async def traffic(n: int) -> None:
        for _ in range(n):
            results.append(await manager.call("sona", lambda: "ok"))
            await asyncio.sleep(0)  # a yield to the loop, as a real call would

    with caplog.at_level(logging.WARNING, logger="gateway_breaker"):
        await traffic(50)
        redis_server.kill()
        await traffic(200)
        await fail(manager, "discovery", 3)  # a transition during the outage
        await traffic(50)
    assert results == ["ok"] * 300
    warnings = [r for r in caplog.records if "falling back to in-memory only" in r.getMessage()]
    assert len(warnings) == 1, "an outage is logged once, not per call"

    redis_server.start()  # empty: the restart lost everything
    await wait_until(
        has_state(redis_server, f"{key_prefix}:discovery:state", "open"),
        timeout=20,
    )
    assert stored(redis_server, key) is None  # a closed breaker writes nothing


@pytest.mark.parametrize(
    "value",
    [
        b"not json",
        b"[1, 2, 3]",
        b'{"state": "melting"}',
        b'{"state": "open", "failure_count": "many", "opened_at": 1}',
        b'{"state": "closed", "failure_count": -4}',
        b'{"state": "open"}',
        b'{"state": "open", "opened_at": 1e308}',
        b"\xff\xfe\x00garbage",
        b'{"state": "' + b"x" * 10_000 + b'"}',
    ],
)
async def test_corrupt_state_is_logged_once_and_ignored(
    redis_shared: RedisServer,
    key_prefix: str,
    managers: list[CircuitBreakerManager],
    caplog: pytest.LogCaptureFixture,
    value: bytes,
) -> None:
    key = f"{key_prefix}:discovery:state"
    redis_shared.client().set(key, value)
    config = make_config(redis_shared.url, key_prefix, sync_interval_seconds=0.02)
    with caplog.at_level(logging.WARNING, logger="gateway_breaker"):
        manager = await CircuitBreakerManager.with_redis(config)
        managers.append(manager)
        breaker = manager.get("discovery")
        assert breaker.state is CircuitState.CLOSED
        assert await manager.call("discovery", lambda: "ok") == "ok"
        # Several periodic re-reads later, still one log line.
        syncs = 0

        async def reread() -> bool:
            nonlocal syncs
            syncs += 1
            return syncs > 10

        await wait_until(reread, interval=0.02)
    lines = [r for r in caplog.records if "unusable circuit breaker state" in r.getMessage()]
    assert len(lines) == 1
    assert "service=discovery" in lines[0].getMessage()
    # The next transition replaces the bad value with a good one.
    await fail(manager, "discovery", 3)
    await wait_until(lambda: stored_state(redis_shared, key)() == "open")


async def test_steady_traffic_sends_no_redis_commands(
    redis_server: RedisServer, key_prefix: str, managers: list[CircuitBreakerManager]
) -> None:
    config = make_config(redis_server.url, key_prefix, sync_interval_seconds=3600)
    manager = await CircuitBreakerManager.with_redis(config)
    managers.append(manager)
    await fail(manager, "discovery", 3)
    await wait_until(has_state(redis_server, f"{key_prefix}:discovery:state", "open"))
    client = redis_server.client()

    def processed() -> int:
        return int(client.info("stats")["total_commands_processed"])

    before = processed()
    for _ in range(1000):
        await manager.call("sona", lambda: "ok")  # closed
        with pytest.raises(CircuitOpenError):
            await manager.call("discovery", lambda: "ok")  # open, rejecting
    after = processed()
    assert after - before == 1  # the INFO command of `before` itself


async def test_password_never_reaches_the_logs(
    tmp_path_factory: pytest.TempPathFactory,
    key_prefix: str,
    managers: list[CircuitBreakerManager],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = RedisServer(tmp_path_factory.mktemp("redis-auth"), password="s3cr3t-pa55")
    server.start()
    try:
        with caplog.at_level(logging.DEBUG):
            good = await CircuitBreakerManager.with_redis(make_config(server.url, key_prefix))
            managers.append(good)
            await fail(good, "discovery", 3)
            await wait_until(has_state(server, f"{key_prefix}:discovery:state", "open"))
            wrong = server.url.replace("s3cr3t-pa55", "wr0ng-pa55")
            bad = await CircuitBreakerManager.with_redis(make_config(wrong, key_prefix))
            managers.append(bad)
            closed_port = f"redis://:s3cr3t-pa55@127.0.0.1:{port_for.select_random()}/0"
            down = await CircuitBreakerManager.with_redis(make_config(closed_port, key_prefix))
            managers.append(down)
        assert "falling back to in-memory only" in caplog.text
        assert "s3cr3t-pa55" not in caplog.text
        assert "wr0ng-pa55" not in caplog.text
        assert "s3cr3t-pa55" not in repr(make_config(server.url))
    finally:
        server.stop()


async def test_aclose_flushes_pending_writes(redis_shared: RedisServer, key_prefix: str) -> None:
    manager = await CircuitBreakerManager.with_redis(make_config(redis_shared.url, key_prefix))
    await fail(manager, "discovery", 3)
    await manager.aclose()  # no chance for the background task to run in between
    assert stored_state(redis_shared, f"{key_prefix}:discovery:state")() == "open"


async def test_with_redis_rejects_config_errors_only() -> None:
    with pytest.raises(ConfigError, match=r"redis\.url"):
        await CircuitBreakerManager.with_redis(Config(redis={"url": None}))
    with pytest.raises(ConfigError, match=r"redis\.url"):
        await CircuitBreakerManager.with_redis(Config(redis={"url": "http://nope:1"}))
