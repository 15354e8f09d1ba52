"""Fleet figures over loopback Redis: propagation latency and Redis commands per transition.

Two managers share a redis-server this script starts on a free port. Manager A makes a breaker
open and close again, over and over; the script times each transition from the moment A's code
makes it until manager B applies it (B learns of it by pub/sub). It also counts the Redis
commands each transition costs, and checks that steady traffic (closed and open) costs none.

    .venv/bin/python benchmarks/fleet_propagation.py            # 200 open/close cycles
    .venv/bin/python benchmarks/fleet_propagation.py --smoke    # a few cycles, for CI
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

import redis

from benchmarks._common import clean_environment, machine, quantile, redis_server, revision
from gateway_breaker import CircuitBreakerManager, CircuitOpenError, CircuitState, Config
from gateway_breaker.store.redis import RedisStateStore


def commands(client: redis.Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


def fail() -> None:
    raise RuntimeError("upstream failed")


async def run(cycles: int, port: int) -> dict[str, Any]:
    config = Config(
        redis={"url": f"redis://127.0.0.1:{port}/0", "sync_interval_seconds": 3600},
        circuit_breaker={
            "services": {"svc": {"failure_threshold": 1, "timeout_seconds": 0.001}, "idle": {}}
        },
    )
    a = await CircuitBreakerManager.with_redis(config)
    b = await CircuitBreakerManager.with_redis(config)
    client = redis.Redis(port=port)
    changed = asyncio.Event()
    seen = b.get("svc")
    adopt = b._sync._adopt  # type: ignore[union-attr]

    def adopt_and_signal(breaker: Any, snapshot: Any) -> None:
        adopt(breaker, snapshot)
        changed.set()

    b._sync._adopt = adopt_and_signal  # type: ignore[union-attr,method-assign]

    async def until_b_is(state: CircuitState) -> None:
        async with asyncio.timeout(2):
            while seen.state is not state:
                changed.clear()
                await changed.wait()

    latencies: dict[str, list[float]] = {"open": [], "closed": []}
    before = commands(client)
    for _ in range(cycles):
        started = time.perf_counter()
        with contextlib.suppress(RuntimeError):
            await a.call("svc", fail)  # closed -> open
        await until_b_is(CircuitState.OPEN)
        latencies["open"].append(time.perf_counter() - started)
        await asyncio.sleep(a.get("svc").retry_after())  # the open period, 1 ms
        started = time.perf_counter()
        await a.call("svc", lambda: "ok")  # open -> half_open -> closed (probe lease + 2 writes)
        await until_b_is(CircuitState.CLOSED)
        latencies["closed"].append(time.perf_counter() - started)
    # Let the last writes land before counting.
    await asyncio.sleep(0.05)
    per_cycle = (commands(client) - before - 1) / cycles

    # Steady state: closed and open traffic on the other breaker.
    idle = "idle"
    before = commands(client)
    for _ in range(2000):
        await a.call(idle, lambda: "ok")
    steady_closed = commands(client) - before - 1
    for _ in range(5):
        with contextlib.suppress(RuntimeError, CircuitOpenError):
            await a.call(idle, fail)
    await asyncio.sleep(0.05)
    before = commands(client)
    for _ in range(2000):
        with contextlib.suppress(CircuitOpenError):
            await a.call(idle, lambda: "ok")
    steady_open = commands(client) - before - 1
    await a.aclose()
    await b.aclose()

    state_key = RedisStateStore(config.redis).key("svc")
    all_ms = [x * 1000 for x in latencies["open"] + latencies["closed"]]
    return {
        "transitions_timed": len(all_ms),
        "propagation_ms": {
            "p50": quantile(all_ms, 0.5),
            "p99": quantile(all_ms, 0.99),
            "max": max(all_ms),
            "open_p50": quantile([x * 1000 for x in latencies["open"]], 0.5),
            "closed_p50": quantile([x * 1000 for x in latencies["closed"]], 0.5),
        },
        "redis_commands_per_open_close_cycle": per_cycle,
        "redis_commands_per_2000_closed_requests": steady_closed,
        "redis_commands_per_2000_open_rejections": steady_open,
        "bytes_stored_per_service": len(client.get(state_key) or b""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--smoke", action="store_true", help="a few cycles, for CI")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    clean_environment()
    cycles = 5 if args.smoke else args.cycles
    with redis_server() as port:
        result = asyncio.run(run(cycles, port))
    result["settings"] = {"smoke": args.smoke, "cycles": cycles}
    result["machine"] = machine()
    result["revision"] = revision()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if (
        result["redis_commands_per_2000_closed_requests"]
        or result["redis_commands_per_2000_open_rejections"]
    ):
        sys.exit("steady traffic sent Redis commands")


if __name__ == "__main__":
    main()
