"""Brownout: classic (all or nothing) against adaptive shedding, on 1 and 3 instances.

A simulated upstream in this process, called through `CircuitBreakerManager.call` at a fixed
fleet-wide rate (open loop, round robin over the instances; 3 instances share a redis-server
this script starts on a free port, 1 instance runs in memory). Two sick upstreams:

- `overload`: serves `--capacity` calls/s well; above that it fails a growing share, (r - C) / C
  of its calls at r calls/s (all of them at twice its capacity), and answers more slowly (up to
  5x its 5 ms), as an overloaded service does. Offered: `--load` times its capacity.
- `fixed-N`: fails N% of its calls whatever its load.

Each run: `--sick` seconds sick, then `--heal` seconds healthy. Reported per run: successful
answers per second and calls the upstream received per second while sick, p99 latency of every
answer while sick (503s included), and the time from the heal to full traffic (the first moment
after which no call was rejected or shed).

    .venv/bin/python benchmarks/brownout.py [--json PATH]
    .venv/bin/python benchmarks/brownout.py --smoke       # seconds, for CI
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import clean_environment, machine, quantile, redis_server, revision
from gateway_breaker import CircuitBreakerManager, CircuitOpenError, Config

BASE_LATENCY = 0.005
TICK = 0.01


class Failed(Exception):
    """The simulated upstream answered with an error."""


class Upstream:
    """The sick service: `overload` (fails above its capacity) or a fixed failing share."""

    def __init__(self, kind: str, capacity: float, seed: int) -> None:
        self.kind = kind
        self.capacity = capacity
        self.share = int(kind.split("-")[1]) / 100 if kind.startswith("fixed-") else 0.0
        self.healthy = False
        self.calls = 0
        self._recent: deque[float] = deque()
        self._random = random.Random(seed)

    async def __call__(self) -> None:
        now = time.monotonic()
        self.calls += 1
        recent = self._recent
        recent.append(now)
        while recent and recent[0] < now - 1.0:
            recent.popleft()
        if self.healthy:
            await asyncio.sleep(BASE_LATENCY)
            return
        if self.kind == "overload":
            excess = min(1.0, max(0.0, (len(recent) - self.capacity) / self.capacity))
            fail, latency = excess, BASE_LATENCY * (1 + 4 * excess)
        else:
            fail, latency = self.share, BASE_LATENCY
        await asyncio.sleep(latency)
        if self._random.random() < fail:
            raise Failed


def config(mode: str, window: float, redis_port: int | None, prefix: str) -> Config:
    policy = {
        "mode": mode,
        "window_seconds": window,
        "min_calls": 20,
        "failure_threshold": 20,
        "error_rate_threshold": 0.5,
        "timeout_seconds": 1.0,
    }
    redis = {} if redis_port is None else {"url": f"redis://127.0.0.1:{redis_port}/0"}
    if redis:
        redis["key_prefix"] = prefix
    return Config(redis=redis, circuit_breaker={"services": {"svc": policy}})


async def one_run(
    kind: str, mode: str, instances: int, args: argparse.Namespace, port: int | None, seed: int
) -> dict[str, Any]:
    cfg = config(mode, args.window, port if instances > 1 else None, f"brownout{seed}")
    if instances > 1:
        managers = [await CircuitBreakerManager.with_redis(cfg) for _ in range(instances)]
    else:
        managers = [CircuitBreakerManager(cfg)]
    upstream = Upstream(kind, args.capacity, seed)
    rate = args.capacity * args.load
    records: list[tuple[float, str, float]] = []  # (start, outcome, latency)

    async def one(manager: CircuitBreakerManager) -> None:
        started = time.monotonic()
        try:
            await manager.call("svc", upstream)
            outcome = "success"
        except CircuitOpenError:
            outcome = "rejected"
        except Failed:
            outcome = "failure"
        records.append((started, outcome, time.monotonic() - started))

    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    healed_at = start + args.sick
    end = healed_at + args.heal
    sent = 0
    sick_calls = 0
    while (now := time.monotonic()) < end:
        if not upstream.healthy and now >= healed_at:
            upstream.healthy = True
            sick_calls = upstream.calls
        due = int((now - start) * rate)
        for _ in range(due - sent):
            task = asyncio.create_task(one(managers[sent % instances]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(TICK)
    if tasks:
        await asyncio.wait(tasks)
    for manager in managers:
        await manager.aclose()

    sick = [r for r in records if r[0] < healed_at]
    after = [r for r in records if r[0] >= healed_at]
    last_rejected = max((r[0] for r in after if r[1] == "rejected"), default=healed_at)
    return {
        "upstream": kind,
        "mode": mode,
        "instances": instances,
        "offered_per_second": round(len(sick) / args.sick, 1),
        "successes_per_second": round(sum(r[1] == "success" for r in sick) / args.sick, 1),
        "upstream_calls_per_second": round(sick_calls / args.sick, 1),
        "rejected_share": round(sum(r[1] == "rejected" for r in sick) / max(1, len(sick)), 3),
        "p99_ms": round(1000 * quantile([r[2] for r in sick], 0.99), 1) if sick else None,
        "seconds_to_full_traffic": round(last_rejected - healed_at, 2),
    }


async def run(args: argparse.Namespace, port: int) -> list[dict[str, Any]]:
    results = []
    seed = 0
    for kind in args.upstreams:
        for instances in args.instances:
            for mode in ("classic", "adaptive"):  # side by side: same upstream, same seed
                seed += 1
                result = await one_run(kind, mode, instances, args, port, seed)
                print(json.dumps(result), flush=True)
                results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--capacity", type=float, default=200, help="calls/s served well")
    parser.add_argument("--load", type=float, default=1.5, help="offered load / capacity")
    parser.add_argument("--sick", type=float, default=8.0, help="seconds the upstream is sick")
    parser.add_argument("--heal", type=float, default=6.0, help="seconds after it heals")
    parser.add_argument("--window", type=float, default=2.0, help="window_seconds")
    parser.add_argument(
        "--upstreams",
        nargs="+",
        default=["overload", "fixed-10", "fixed-40", "fixed-70", "fixed-90"],
    )
    parser.add_argument("--instances", nargs="+", type=int, default=[1, 3])
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.smoke:
        args.sick, args.heal, args.window, args.upstreams = 1.5, 1.5, 1.0, ["overload"]
    clean_environment()
    with redis_server() as port:
        results = asyncio.run(run(args, port))
    out = {
        "settings": {
            "smoke": args.smoke,
            "capacity": args.capacity,
            "load": args.load,
            "sick_seconds": args.sick,
            "heal_seconds": args.heal,
            "window_seconds": args.window,
            "upstreams": args.upstreams,
            "instances": args.instances,
        },
        "runs": results,
        "machine": machine(),
        "revision": revision(),
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
