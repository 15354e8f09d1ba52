"""Whatever is published on the events channel, an instance drops it, counts it and goes on."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway_breaker import CircuitBreakerManager, CircuitState, Config
from gateway_breaker.store.redis import RedisStateStore
from tests.conftest import RedisServer
from tests.helpers import wait_until

pytestmark = pytest.mark.redis


def boom() -> None:
    raise RuntimeError("upstream failed")


async def open_breaker(manager: CircuitBreakerManager, service: str) -> None:
    while manager.get(service).state is not CircuitState.OPEN:
        with pytest.raises(RuntimeError):
            await manager.call(service, boom)


def store_of(manager: CircuitBreakerManager) -> RedisStateStore:
    assert manager._sync is not None
    store = manager._sync.store
    assert isinstance(store, RedisStateStore)
    return store


@pytest.fixture
async def pair(
    redis_shared: RedisServer, key_prefix: str
) -> AsyncIterator[tuple[CircuitBreakerManager, CircuitBreakerManager]]:
    config = Config(
        # Announcements only: a periodic re-read would hide a dead listener.
        redis={"url": redis_shared.url, "key_prefix": key_prefix, "sync_interval_seconds": 3600},
        circuit_breaker={
            "services": {"discovery": {"failure_threshold": 2}, "sona": {"failure_threshold": 2}}
        },
    )
    a = await CircuitBreakerManager.with_redis(config)
    b = await CircuitBreakerManager.with_redis(config)
    yield a, b
    await a.aclose()
    await b.aclose()


def publisher(server: RedisServer, key_prefix: str) -> Callable[[bytes | str], None]:
    client = server.client()
    return lambda message: client.publish(f"{key_prefix}:events", message) and None


async def subscribed(server: RedisServer, key_prefix: str, n: int) -> None:
    channel = f"{key_prefix}:events"

    def listening() -> bool:
        counts = dict(server.client().pubsub_numsub(channel))
        return int(counts.get(channel.encode(), 0)) >= n

    await wait_until(listening, message="both instances subscribed")


def forged(service: str, version: int = 999, state: str = "open") -> str:
    now = int(time.time())
    doc = {"state": state, "failure_count": 9, "opened_at": now, "version": version}
    return json.dumps({"origin": "someone", "service": service, "state": doc})


async def test_a_flood_of_hostile_events_is_dropped_counted_and_logged_once(
    pair: tuple[CircuitBreakerManager, CircuitBreakerManager],
    redis_shared: RedisServer,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = pair
    publish = publisher(redis_shared, key_prefix)
    flood: list[bytes | str] = [b"x" * 1_000_000]
    for i in range(50):
        flood += [
            b"not json",
            b"\xff\xfe garbage",
            "[" * 2000 + "]" * 2000,  # deep enough to exhaust a recursive parser
            '{"service":"discovery","state":' + "[" * 1500 + "]" * 1500 + "}",
            b"x" * 10_000,
            '{"service":"discovery","state":{"state":"melting","version":5}}',
            forged("discovery", version=10**6 + i),
            forged(f"invented-{i}"),
        ]
    await subscribed(redis_shared, key_prefix, 2)
    with caplog.at_level(logging.WARNING, logger="gateway_breaker"):
        for message in flood:
            publish(message)
        for m in (a, b):
            store = store_of(m)
            await wait_until(
                lambda store=store: sum(store.dropped_events.values()) >= len(flood),
                timeout=20,
                message="the flood dropped",
            )
        # After the flood, a real transition still arrives.
        await open_breaker(a, "sona")
        await wait_until(lambda: b.get("sona").state is CircuitState.OPEN, timeout=2)
    dropped = store_of(b).dropped_events
    assert dropped["malformed"] == 200
    assert dropped["oversized"] == 51
    assert dropped["invalid_state"] == 50
    assert dropped["forged"] == 50
    assert dropped["unknown_service"] == 50
    # The forgeries steered nothing, and invented services were never cached.
    assert b.get("discovery").state is CircuitState.CLOSED
    assert set(store_of(b)._decoded) <= {"discovery", "sona"}
    # Once per kind and instance (both saw the flood).
    lines = [r.getMessage() for r in caplog.records if "Dropped a circuit breaker event" in r.msg]
    kinds = sorted(line.split("kind=")[1].split(",")[0] for line in lines)
    assert kinds == sorted(["forged", "invalid_state", "malformed", "oversized"] * 2)
    assert b._sync is not None
    assert b._sync.connected
    # The channel still carries every transition, both ways.
    await open_breaker(b, "discovery")
    await wait_until(lambda: a.get("discovery").state is CircuitState.OPEN, timeout=2)


async def test_the_listener_survives_an_unexpected_error(
    pair: tuple[CircuitBreakerManager, CircuitBreakerManager],
    redis_shared: RedisServer,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = pair
    store = store_of(b)
    original = store._decode_event
    failures = 0

    def broken_once(data: Any) -> Any:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise RuntimeError("a bug nobody foresaw")
        return original(data)

    monkeypatch.setattr(store, "_decode_event", broken_once)
    await subscribed(redis_shared, key_prefix, 2)
    with caplog.at_level(logging.ERROR, logger="gateway_breaker"):
        await open_breaker(a, "discovery")
        await wait_until(lambda: failures == 1, message="the listener hit the bug")
        # The bug is raised inside the listener; its log line follows when the task handles it.
        await wait_until(
            lambda: "event listener failed; restarting it" in caplog.text,
            timeout=10,
            message="the listener's log line",
        )
    # Restarted, it resubscribed and re-read: the transition it lost is adopted, later ones too.
    await wait_until(lambda: b.get("discovery").state is CircuitState.OPEN, timeout=10)
    await open_breaker(a, "sona")
    await wait_until(lambda: b.get("sona").state is CircuitState.OPEN, timeout=10)
