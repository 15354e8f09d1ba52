"""Hostile Redis contents and a hostile events channel: does sharing go on, how fast, at what cost?

Two managers share a redis-server this script starts on a free port (default settings, so the
periodic re-read runs every second). For each odd value planted under a state key, manager A
opens that breaker and the script times how long manager B takes to apply it, and how long
another service's transition takes meanwhile; it checks that neither instance fell back to
memory. Then it publishes a flood of malformed, oversized, deeply nested, forged and unknown-
service announcements on the events channel, and measures the process's memory growth, the
drop counters and the propagation of a transition right after the flood.

    .venv/bin/python benchmarks/hostile.py                 # 20,000 hostile events
    .venv/bin/python benchmarks/hostile.py --smoke         # a few of each, for CI
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis
import redis.asyncio

from benchmarks._common import clean_environment, machine, redis_server, revision
from gateway_breaker import CircuitBreakerManager, CircuitState, Config
from gateway_breaker.store.redis import RedisStateStore

BIG = 10**9
PLANTED: dict[str, bytes | None] = {
    "open without opened_at": b'{"state":"open","failure_count":1,"version":1000000000}',
    "float version": b'{"state":"closed","version":1000000000.5}',
    "string version": b'{"state":"closed","version":"1000000000"}',
    "negative count": b'{"state":"closed","failure_count":-3,"version":1000000000}',
    "version past 2**53": b'{"state":"closed","version":9007199254740993}',
    "NaN time": b'{"state":"closed","last_failure_time":NaN,"version":1000000000}',
    "opened far in the future": b'{"state":"open","opened_at":99999999999999,"version":1}',
    "oversized (5 KB)": b'{"state":"closed","version":1000000000,"pad":"' + b"x" * 5000 + b'"}',
    "not UTF-8": b'{"state":"closed","version":1000000000,"x":"\xff"}',
    "list under the key (WRONGTYPE)": None,
    "seed format, no version": b'{"state":"closed","failure_count":0,"success_count":0}',
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def fail() -> None:
    raise RuntimeError("upstream failed")


def connected(*managers: CircuitBreakerManager) -> bool:
    return all(m._sync is not None and m._sync.connected for m in managers)


async def open_breaker(manager: CircuitBreakerManager, service: str) -> None:
    while manager.get(service).state is not CircuitState.OPEN:
        with contextlib.suppress(RuntimeError):
            await manager.call(service, fail)


async def seconds_until(condition: Any, limit: float = 5.0) -> float:
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > limit:
            return float("inf")
        await asyncio.sleep(0.0005)
    return time.perf_counter() - started


def config(port: int, prefix: str) -> Config:
    return Config(
        redis={"url": f"redis://127.0.0.1:{port}/0", "key_prefix": prefix},
        circuit_breaker={"services": {"svc": {"failure_threshold": 1}, "other": {}}},
    )


async def planted(port: int) -> list[dict[str, Any]]:
    client = redis.Redis(port=port)
    rows = []
    for name, value in PLANTED.items():
        prefix = f"hostile_{uuid.uuid4().hex[:8]}"
        key = f"{prefix}:svc:state"
        if value is None:
            client.rpush(key, "x")
        else:
            client.set(key, value)
        a = await CircuitBreakerManager.with_redis(config(port, prefix))
        b = await CircuitBreakerManager.with_redis(config(port, prefix))
        try:
            started = time.perf_counter()
            await open_breaker(a, "svc")
            waited = await seconds_until(lambda b=b: b.get("svc").state is CircuitState.OPEN)
            to_b = time.perf_counter() - started if waited != float("inf") else waited
            started = time.perf_counter()
            await open_breaker(a, "other")
            await seconds_until(lambda b=b: b.get("other").state is CircuitState.OPEN)
            other = time.perf_counter() - started
            rows.append(
                {
                    "value": name,
                    "transition_reaches_b_ms": round(to_b * 1000, 2),
                    "other_service_ms": round(other * 1000, 2),
                    "stored_version": json.loads(client.get(key) or b"{}").get("version"),
                    "both_connected": connected(a, b),
                }
            )
        finally:
            await a.aclose()
            await b.aclose()
    return rows


def hostile_messages(count: int) -> list[bytes]:
    now = int(time.time())
    kinds = [
        b"not json",
        b"\xff\xfe garbage",
        b"[" * 2000 + b"]" * 2000,
        b'{"service":"svc","state":' + b"[" * 1500 + b"]" * 1500 + b"}",
        b"x" * 10_000,
        b'{"service":"svc","state":{"state":"melting","version":5}}',
    ]
    messages = []
    for i in range(count):
        if i % 8 < len(kinds):
            messages.append(kinds[i % 8])
        elif i % 8 == 6:
            state = {"state": "open", "opened_at": now, "version": BIG + i}
            messages.append(json.dumps({"origin": "x", "service": "svc", "state": state}).encode())
        else:  # a service nobody uses, with a new name each time
            state = {"state": "open", "opened_at": now, "version": 1}
            doc = {"origin": "x", "service": f"invented-{i}", "state": state}
            messages.append(json.dumps(doc).encode())
    return messages


async def flood(port: int, count: int) -> dict[str, Any]:
    prefix = f"hostile_{uuid.uuid4().hex[:8]}"
    a = await CircuitBreakerManager.with_redis(config(port, prefix))
    b = await CircuitBreakerManager.with_redis(config(port, prefix))
    publisher = redis.asyncio.Redis(port=port)
    try:
        store = b._sync.store  # type: ignore[union-attr]
        assert isinstance(store, RedisStateStore)
        messages = hostile_messages(count)
        gc.collect()
        before = rss_bytes()
        started = time.perf_counter()
        # In batches, each drained before the next: a subscriber that falls 8 MB behind is cut
        # off by Redis itself (client-output-buffer-limit pubsub), which would hide the figures.
        for start in range(0, count, 200):
            pipe = publisher.pipeline(transaction=False)
            batch = messages[start : start + 200]
            for message in batch:
                pipe.publish(f"{prefix}:events", message)
            await pipe.execute()
            done = start + len(batch)
            await seconds_until(lambda d=done: sum(store.dropped_events.values()) >= d, limit=30)
        drained = time.perf_counter() - started
        del messages
        gc.collect()
        after = rss_bytes()
        started = time.perf_counter()
        await open_breaker(a, "other")
        await seconds_until(lambda: b.get("other").state is CircuitState.OPEN)
        propagation = time.perf_counter() - started
        return {
            "events": count,
            "drained_s": round(drained, 2),
            "events_per_s": round(count / drained),
            "dropped": dict(store.dropped_events),
            "rss_growth_mb": round((after - before) / 2**20, 2),
            "cached_services": sorted(store._decoded),
            "svc_state_on_b": b.get("svc").state.value,
            "propagation_after_ms": round(propagation * 1000, 2),
            "both_connected": connected(a, b),
        }
    finally:
        await publisher.aclose()
        await a.aclose()
        await b.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--smoke", action="store_true", help="a few events, for CI")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    clean_environment()
    events = 400 if args.smoke else args.events
    info: dict[str, Any] = {"machine": machine(), "revision": revision()}
    with redis_server() as port:
        rows = asyncio.run(planted(port))
        flooded = asyncio.run(flood(port, events))
    print("| planted value | A -> B (ms) | other service (ms) | version after | connected |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['value']} | {row['transition_reaches_b_ms']} | {row['other_service_ms']}"
            f" | {row['stored_version']} | {row['both_connected']} |"
        )
    print()
    print(json.dumps(flooded, indent=2))
    results = {
        **info,
        "settings": {"smoke": args.smoke, "events": events},
        "planted": rows,
        "flood": flooded,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
