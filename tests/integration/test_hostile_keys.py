"""Every Redis key of the package is checked like the state key: the instance registry, instance
entries, history entries, policy overrides and evidence. A bad value affects its own feature and
service only; it is repaired or ignored and counted, never an outage, a 500 or a blank page."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway_breaker import CircuitBreakerManager, CircuitState, Config
from gateway_breaker.errors import ConfigError
from tests.conftest import RedisServer
from tests.helpers import wait_until

pytestmark = pytest.mark.redis


def config(url: str, key_prefix: str, interval: float = 0.05) -> Config:
    return Config(
        redis={"url": url, "key_prefix": key_prefix, "sync_interval_seconds": interval},
        circuit_breaker={
            "services": {"discovery": {"failure_threshold": 3}, "sona": {"failure_threshold": 3}}
        },
    )


@pytest.fixture
async def start(redis_shared: RedisServer, key_prefix: str) -> AsyncIterator[Callable[..., Any]]:
    created: list[CircuitBreakerManager] = []

    async def make(n: int, interval: float = 0.05) -> list[CircuitBreakerManager]:
        cfg = config(redis_shared.url, key_prefix, interval)
        managers = [await CircuitBreakerManager.with_redis(cfg) for _ in range(n)]
        created.extend(managers)
        return managers

    yield make
    for manager in created:
        await manager.aclose()


def boom() -> None:
    raise RuntimeError("upstream failed")


async def open_breaker(manager: CircuitBreakerManager, service: str = "discovery") -> None:
    while manager.get(service).state is not CircuitState.OPEN:
        with pytest.raises(RuntimeError):
            await manager.call(service, boom)


def json_safe(data: Any) -> str:
    return json.dumps(data, allow_nan=False)


async def test_a_string_at_the_instance_registry_switches_nothing_off(
    start: Any, redis_shared: RedisServer, key_prefix: str
) -> None:
    client = redis_shared.client()
    client.set(f"{key_prefix}:instances", "not a sorted set")
    a, b = await start(2)
    for _ in range(3):  # several heartbeats: a reconnect loop would show by now
        client.set(f"{key_prefix}:instances", "not a sorted set")
        await wait_until(lambda: client.type(f"{key_prefix}:instances") == b"zset", timeout=3)
    assert a.store_up
    assert b.store_up
    await open_breaker(a)
    await wait_until(lambda: b.get("discovery").state is CircuitState.OPEN, timeout=3)

    async def both_listed() -> bool:
        fleet = await b.fleet()
        return {i.id for i in fleet.instances} >= {a.instance_id, b.instance_id}

    await wait_until(both_listed, timeout=3, interval=0.05, message="both in the fleet view")
    assert a.store_up
    assert b.store_up


def plant_instance(client: Any, key_prefix: str, name: str, doc: str) -> None:
    client.set(f"{key_prefix}:instance:{name}", doc)
    client.zadd(f"{key_prefix}:instances", {name: 10**13})


@pytest.mark.parametrize(
    "doc",
    [
        '{"id":"x","host":"h","pid":1,"started_at":NaN,"last_seen":NaN,"version":"1","breakers":{}}',
        '{"id":"x","host":"h","pid":1,"started_at":1e400,"last_seen":Infinity,"version":"1",'
        '"breakers":{}}',
        '{"id":"x","host":"h","pid":' + "9" * 5000 + ',"started_at":1,"last_seen":1,'
        '"version":"1","breakers":{}}',
        '{"id":"x","host":"' + "h" * 100_000 + '","pid":1,"started_at":1,"last_seen":1,'
        '"version":"1","breakers":{}}',
        '{"id":"x","host":"h","pid":1,"started_at":1,"last_seen":1,"version":"1",'
        '"breakers":{"discovery":{"state":"open","version":1e30}}}',
        '{"id":"x","host":"h","pid":1,"started_at":1,"last_seen":1,"version":"1",'
        '"breakers":{"discovery":{"state":"' + "o" * 1000 + '","version":1}}}',
        "[1,2,3]",
    ],
)
async def test_an_odd_instance_entry_is_left_out_of_the_fleet_view(
    start: Any, redis_shared: RedisServer, key_prefix: str, doc: str
) -> None:
    (a,) = await start(1)
    plant_instance(redis_shared.client(), key_prefix, "planted", doc)
    fleet = await a.fleet()
    json_safe(fleet.to_dict())
    assert a.instance_id in {i.id for i in fleet.instances}
    for instance in fleet.instances:
        assert len(instance.host) <= 255
        assert all(len(state) <= 20 for state, _ in instance.breakers.values())
    assert a.store_up


@pytest.mark.parametrize(
    "fields",
    [
        {"at": "1e400"},
        {"at": "9" * 400},
        {"failure_rate": "inf"},
        {"failure_rate": "nan"},
        {"version": "9" * 400},
        {"failure_count": "-5"},
        {"reason": "x" * 2_000_000},
    ],
)
async def test_odd_history_entries_are_left_out_or_bounded(
    start: Any, redis_shared: RedisServer, key_prefix: str, fields: dict[str, str]
) -> None:
    (a,) = await start(1)
    await open_breaker(a)
    entry = {
        "at": "1700000000000",
        "from": "closed",
        "to": "open",
        "cause": "manual",
        "origin": "manual",
        "instance": "planted",
        "version": "5",
        "failure_count": "1",
        "failure_rate": "",
        "reason": "",
        **fields,
    }
    await wait_until(lambda: bool(redis_shared.client().exists(f"{key_prefix}:discovery:history")))
    redis_shared.client().xadd(f"{key_prefix}:discovery:history", entry)
    events = await a.history("discovery", limit=10)
    assert events  # the good entries are still there
    for event in events:
        json_safe(event.to_dict())
        assert event.reason is None or len(event.reason) <= 200
        assert math.isfinite(event.at)
    assert a.store_up


async def test_a_history_key_of_another_type_is_an_empty_history(
    start: Any, redis_shared: RedisServer, key_prefix: str
) -> None:
    (a,) = await start(1)
    redis_shared.client().set(f"{key_prefix}:sona:history", "not a stream")
    assert await a.history("sona", limit=10) == []
    assert a.store_up


async def test_a_policy_too_large_to_be_read_back_is_refused_on_write(
    start: Any, redis_shared: RedisServer, key_prefix: str
) -> None:
    (a,) = await start(1)
    await a.set_policy("sona", {"failure_threshold": 7})
    codes = list(range(500, 600)) * 30  # valid, and over 8 KiB of JSON
    with pytest.raises(ConfigError):
        await a.set_policy("sona", {"failure_status_codes": codes})
    stored = json.loads(redis_shared.client().get(f"{key_prefix}:sona:policy") or b"null")
    assert stored == {"failure_threshold": 7}
    assert a.get("sona").policy.failure_threshold == 7


async def test_an_oversized_stored_policy_keeps_the_earlier_one(
    start: Any, redis_shared: RedisServer, key_prefix: str
) -> None:
    (a,) = await start(1)
    await a.set_policy("sona", {"failure_threshold": 7})
    await wait_until(lambda: a.get("sona").policy.failure_threshold == 7)
    redis_shared.client().set(
        f"{key_prefix}:sona:policy", json.dumps({"failure_threshold": 9, "pad": "x" * 20_000})
    )
    (b,) = await start(1)  # reads it at start; a re-reads it every 50 ms
    await wait_until(lambda: b.store_up)
    for _ in range(3):
        await a._sync._load_policies(["sona"])  # type: ignore[union-attr]
    assert a.get("sona").policy.failure_threshold == 7
    assert a.store_up


def test_the_cli_answers_with_a_string_at_the_registry(
    redis_shared: RedisServer,
    key_prefix: str,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gateway_breaker.cli import main

    redis_shared.client().set(f"{key_prefix}:instances", "not a sorted set")
    path = tmp_path / "cli.yaml"
    path.write_text(
        f"redis:\n  url: {redis_shared.url}\n  key_prefix: {key_prefix}\n"
        "circuit_breaker:\n  services:\n    discovery: {}\n"
    )
    for args in (["fleet"], ["status"], ["open", "discovery"], ["release", "discovery"]):
        assert main(["--config", str(path), *args]) == 0, capsys.readouterr().err
    assert "Redis did not answer" not in capsys.readouterr().err


async def test_rejected_values_are_counted_in_the_metrics(
    start: Any, redis_shared: RedisServer, key_prefix: str
) -> None:
    from gateway_breaker.metrics import BreakerCollector, text_format

    (a,) = await start(1)
    plant_instance(redis_shared.client(), key_prefix, "planted", "[1,2,3]")
    await a.fleet()
    await a.fleet()
    assert a.store_rejected == {"instance": 2}
    assert 'gateway_breaker_store_rejected_values_total{kind="instance"} 2.0' in (
        text_format(BreakerCollector(a)).decode()
    )
