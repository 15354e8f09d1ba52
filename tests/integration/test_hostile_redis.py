"""Whatever sits under a breaker's keys, sharing goes on: odd values, wrong key types, the
seed's own unversioned format, deleted keys."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway_breaker import CircuitBreakerManager, CircuitOpenError, CircuitState, Config
from tests.conftest import RedisServer
from tests.helpers import wait_until
from tests.integration.conftest import probe_burst

pytestmark = pytest.mark.redis

BIG = 10**9  # a version the fleet would have to climb to before writing again

PLANTED = {
    "open without opened_at": f'{{"state":"open","failure_count":1,"version":{BIG}}}',
    "float version": f'{{"state":"closed","version":{BIG}.5}}',
    "integral float version": f'{{"state":"closed","version":{BIG}.0}}',
    "string version": f'{{"state":"closed","version":"{BIG}"}}',
    "negative count": f'{{"state":"closed","failure_count":-3,"version":{BIG}}}',
    "version past 2**53": '{"state":"closed","version":9007199254740993}',
    "huge version": '{"state":"closed","version":1e300}',
    "NaN time": f'{{"state":"closed","last_failure_time":NaN,"version":{BIG}}}',
    "absurd future": f'{{"state":"open","opened_at":99999999999999,"version":{BIG}}}',
    "oversized": f'{{"state":"closed","version":{BIG},"pad":"{"x" * 5000}"}}',
    "not UTF-8": b'{"state":"closed","version":1000000000,"x":"\xff"}',
    "bool count": f'{{"state":"closed","success_count":true,"version":{BIG}}}',
    "wrong key type": None,  # a list under the state key
}


def hostile_config(url: str, key_prefix: str, interval: float = 3600, **policy: Any) -> Config:
    discovery = {"failure_threshold": 3, "timeout_seconds": 5, **policy}
    return Config(
        redis={"url": url, "key_prefix": key_prefix, "sync_interval_seconds": interval},
        circuit_breaker={"services": {"discovery": discovery, "sona": {"failure_threshold": 3}}},
    )


def boom() -> None:
    raise RuntimeError("upstream failed")


async def open_breaker(manager: CircuitBreakerManager, service: str = "discovery") -> None:
    while manager.get(service).state is not CircuitState.OPEN:
        with pytest.raises(RuntimeError):
            await manager.call(service, boom)


def connected(manager: CircuitBreakerManager) -> bool:
    return bool(manager._sync and manager._sync.connected)


@pytest.fixture
async def start(redis_shared: RedisServer, key_prefix: str) -> AsyncIterator[Callable[..., Any]]:
    created: list[CircuitBreakerManager] = []

    async def make(n: int, interval: float = 3600, **policy: Any) -> list[CircuitBreakerManager]:
        config = hostile_config(redis_shared.url, key_prefix, interval, **policy)
        managers = [await CircuitBreakerManager.with_redis(config) for _ in range(n)]
        created.extend(managers)
        return managers

    yield make
    for manager in created:
        await manager.aclose()


@pytest.mark.parametrize("name", list(PLANTED))
async def test_a_planted_value_never_blocks_the_next_write(
    start: Any,
    redis_shared: RedisServer,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
    name: str,
) -> None:
    key = f"{key_prefix}:discovery:state"
    client = redis_shared.client()
    value = PLANTED[name]
    if value is None:
        client.rpush(key, "x", "y")
    else:
        client.set(key, value)
    with caplog.at_level(logging.WARNING, logger="gateway_breaker"):
        a, b = await start(2)
        # Nothing planted holds a fresh instance open longer than the policy allows.
        assert b.get("discovery").retry_after() <= 5
        await open_breaker(a)
        await wait_until(
            lambda: b.get("discovery").state is CircuitState.OPEN,
            timeout=2,
            message="the transition reaching the other instance",
        )
        doc = json.loads(client.get(key) or b"null")
        assert doc["state"] == "open"
        assert isinstance(doc["version"], int)
        assert 0 < doc["version"] < 2**53
        # Other services keep propagating, and nobody fell back to memory.
        await open_breaker(a, "sona")
        await wait_until(lambda: b.get("sona").state is CircuitState.OPEN, timeout=2)
    assert connected(a)
    assert connected(b)
    assert "falling back to in-memory only" not in caplog.text


async def test_the_largest_exact_version_is_followed_by_one(
    start: Any, redis_shared: RedisServer, key_prefix: str
) -> None:
    key = f"{key_prefix}:discovery:state"
    redis_shared.client().set(key, f'{{"state":"closed","version":{2**53 - 1}}}')
    a, b = await start(2)
    assert a.get("discovery").version == 2**53 - 1
    await open_breaker(a)
    await wait_until(lambda: b.get("discovery").state is CircuitState.OPEN, timeout=2)
    assert json.loads(redis_shared.client().get(key) or b"null")["version"] == 1
    assert b.get("discovery").version == 1


async def test_a_wrong_type_probe_key_keeps_the_fleet_to_one_probe(
    start: Any, redis_shared: RedisServer, key_prefix: str
) -> None:
    managers = await start(2, timeout_seconds=0.2)
    await open_breaker(managers[0])
    for m in managers:
        await wait_until(lambda m=m: m.get("discovery").state is CircuitState.OPEN)
        await wait_until(lambda m=m: m.get("discovery").retry_after() == 0, timeout=2)
    redis_shared.client().set(f"{key_prefix}:discovery:probe", "not a sorted set")
    probes, results = await probe_burst(managers, "discovery", 12)
    assert probes == 1
    assert results.count("ok") == 1
    assert all(connected(m) for m in managers)


async def test_a_seed_format_open_state_is_honoured_then_versioned(
    start: Any, redis_shared: RedisServer, key_prefix: str
) -> None:
    key = f"{key_prefix}:discovery:state"
    client = redis_shared.client()
    (warm,) = await start(1, interval=0.05, timeout_seconds=3)
    now = int(time.time())  # whole seconds, as the seed writes them: up to 1 s ago
    seed = {
        "state": "open",
        "failure_count": 15,
        "success_count": 0,
        "last_failure_time": now,
        "opened_at": now,
    }
    client.set(key, json.dumps(seed))
    (fresh,) = await start(1, interval=0.05, timeout_seconds=3)
    assert fresh.get("discovery").state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        await fresh.call("discovery", lambda: "ok")
    # An instance that was running already honours it on its next re-read.
    await wait_until(lambda: warm.get("discovery").state is CircuitState.OPEN, timeout=2)
    assert warm.get("discovery").failure_count == 15

    # The period ends; the probe's success is the next write, versioned.
    async def probe_passes() -> bool:
        try:
            return await fresh.call("discovery", lambda: "ok") == "ok"
        except CircuitOpenError:
            return False

    await wait_until(probe_passes, timeout=8, interval=0.05)

    def versioned_closed() -> bool:
        doc = json.loads(client.get(key) or b"null")
        return doc is not None and doc["state"] == "closed" and doc.get("version", 0) >= 1

    await wait_until(versioned_closed, timeout=2)
    await wait_until(lambda: warm.get("discovery").state is CircuitState.CLOSED, timeout=2)


async def test_deleting_the_key_resets_the_breaker_fleet_wide(
    start: Any, redis_shared: RedisServer, key_prefix: str
) -> None:
    key = f"{key_prefix}:discovery:state"
    a, b = await start(2, interval=0.05)
    await open_breaker(a)
    await wait_until(lambda: b.get("discovery").state is CircuitState.OPEN, timeout=2)
    await wait_until(lambda: a.get("discovery").version > 0)
    redis_shared.client().delete(key)
    for m in (a, b):
        await wait_until(lambda m=m: m.get("discovery").state is CircuitState.CLOSED, timeout=2)
    assert await b.call("discovery", lambda: "ok") == "ok"
    assert redis_shared.client().get(key) is None  # nobody put the open state back


async def probe_passes(manager: CircuitBreakerManager) -> bool:
    try:
        return await manager.call("discovery", lambda: "ok") == "ok"
    except CircuitOpenError:
        return False


async def half_open_pair(start: Any, **policy: Any) -> list[CircuitBreakerManager]:
    managers: list[CircuitBreakerManager] = await start(2, timeout_seconds=0.2, **policy)
    await open_breaker(managers[0])
    for m in managers:
        await wait_until(lambda m=m: m.get("discovery").state is CircuitState.OPEN)
        await wait_until(lambda m=m: m.get("discovery").retry_after() == 0, timeout=2)
    return managers


async def test_a_peer_learns_at_once_that_a_probe_slot_was_given_back(start: Any) -> None:
    a, b = await half_open_pair(start, probe_lease_seconds=60)
    breaker = a.get("discovery")
    permit = breaker.acquire()
    assert permit is not None
    assert await a.lease_probe(breaker, permit)
    assert not await probe_passes(b)  # A probes
    breaker.release(permit)  # A's client left: no outcome, the slot is given back
    await wait_until(lambda: probe_passes(b), timeout=3, interval=0.05)
    assert b.get("discovery").state is CircuitState.CLOSED


async def test_an_abandoned_probe_frees_the_fleets_slot_at_its_deadline(start: Any) -> None:
    a, b = await half_open_pair(start, probe_lease_seconds=60, slow_call_seconds=0.5)
    breaker = a.get("discovery")
    permit = breaker.acquire()
    assert permit is not None
    assert await a.lease_probe(breaker, permit)
    assert not await probe_passes(b)
    # A hangs (or dies) and says nothing: past slow_call_seconds the slot is the fleet's again.
    await wait_until(lambda: probe_passes(b), timeout=5, interval=0.05)
    assert b.get("discovery").state is CircuitState.CLOSED
