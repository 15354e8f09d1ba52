"""Fleet evidence figures over loopback Redis: how many failures the fleet lets through.

N managers (instances) share a redis-server this script starts on a free port. A driver sends
calls to a failing upstream round-robin over the instances at a fixed fleet-wide rate, until
every instance rejects; it counts the calls that reached the upstream. Run with per-instance
counting (`counting: instance`, each instance needs its own failure_threshold) and with fleet
counting (the default), for 1, 3 and 10 instances. Also measured: the time from the
threshold-th failure to every instance rejecting, the Redis commands each instance sends per
second while failures flow (rules out of reach, so nothing opens), and in steady traffic.

    .venv/bin/python benchmarks/fleet_evidence.py            # 5 repetitions per setting
    .venv/bin/python benchmarks/fleet_evidence.py --smoke    # 1 repetition, few settings (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from benchmarks._common import clean_environment, machine, redis_server, revision
from gateway_breaker import CircuitBreakerManager, CircuitOpenError, CircuitState, Config

THRESHOLD = 12


def config(port: int, prefix: str, counting: str, threshold: int = THRESHOLD) -> Config:
    policy = {"failure_threshold": threshold, "min_calls": 10**6, "timeout_seconds": 60}
    return Config(
        redis={
            "url": f"redis://127.0.0.1:{port}/0",
            "key_prefix": prefix,
            "sync_interval_seconds": 3600,  # no periodic re-read: only evidence and writes
        },
        circuit_breaker={"services": {"svc": {**policy, "counting": counting}}},
    )


async def fleet(cfg: Config, n: int) -> list[CircuitBreakerManager]:
    return [await CircuitBreakerManager.with_redis(cfg) for _ in range(n)]


async def close(managers: list[CircuitBreakerManager]) -> None:
    for manager in managers:
        await manager.aclose()


async def outage(port: int, prefix: str, n: int, counting: str, rate: float) -> dict[str, Any]:
    """Failing calls round-robin at `rate` per second until every instance rejects."""
    managers = await fleet(config(port, prefix, counting), n)
    reached = 0
    threshold_at: float | None = None

    def upstream() -> None:
        nonlocal reached, threshold_at
        reached += 1
        if reached == THRESHOLD:
            threshold_at = time.perf_counter()
        raise RuntimeError("upstream failed")

    breakers = [m.get("svc") for m in managers]
    period = 1 / rate
    start = time.perf_counter()
    i = 0
    while not all(b.state is CircuitState.OPEN for b in breakers):
        with contextlib.suppress(RuntimeError, CircuitOpenError):
            await managers[i % n].call("svc", upstream)
        i += 1
        # Paced on the clock: the i-th call is due at start + i * period.
        await asyncio.sleep(max(0.0, start + i * period - time.perf_counter()))
        if time.perf_counter() - start > 30:
            raise SystemExit(f"{n} instances, {counting}: not all rejecting after 30 s")
    all_rejecting = time.perf_counter()
    await close(managers)
    assert threshold_at is not None
    return {"failed_calls": reached, "ms_from_threshold": (all_rejecting - threshold_at) * 1000}


def script_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(k, {}).get("calls", 0)) for k in ("cmdstat_evalsha", "cmdstat_eval"))


def total_commands(client: redis.Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


async def traffic(port: int, prefix: str, n: int, seconds: float, fail: bool) -> dict[str, Any]:
    """Redis commands per second per instance while every instance serves 200 calls/s."""
    managers = await fleet(config(port, f"{prefix}t", "fleet", threshold=10**6), n)
    client = redis.Redis(port=port)
    await asyncio.sleep(0.2)  # subscriptions and their re-reads settle before counting
    scripts = script_calls(client)
    before = total_commands(client)

    def upstream() -> None:
        if fail:
            raise RuntimeError("upstream failed")

    start = time.perf_counter()
    calls = 0
    while time.perf_counter() - start < seconds:
        for manager in managers:
            with contextlib.suppress(RuntimeError):
                await manager.call("svc", upstream)
            calls += 1
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - start
    await asyncio.sleep(0.1)  # the last flush lands
    sent = total_commands(client) - before - 1  # less the INFO that read `before`
    evidence = script_calls(client) - scripts
    client.close()
    await close(managers)
    return {
        "calls": calls,
        # Round trips: each is one script call (EVALSHA), or a plain command.
        "script_calls_per_second_per_instance": evidence / elapsed / n,
        # Commands Redis ran, counting those inside the scripts (TIME, HSET, HGETALL, ...).
        "commands_per_second_per_instance": sent / elapsed / n,
        "commands_per_call": sent / calls,
    }


async def run(port: int, sizes: list[int], repeat: int, rate: float, seconds: float) -> Any:
    results: dict[str, Any] = {"failed_calls": {}, "ms_from_threshold_to_all_rejecting": {}}
    k = 0
    for n in sizes:
        for counting in ("instance", "fleet"):
            runs = []
            for _ in range(repeat):
                k += 1
                runs.append(await outage(port, f"bench{k}", n, counting, rate))
            key = f"{n} instances, {counting}"
            failed = [r["failed_calls"] for r in runs]
            results["failed_calls"][key] = {
                "median": statistics.median(failed),
                "max": max(failed),
                "runs": failed,
            }
            delays = [r["ms_from_threshold"] for r in runs]
            results["ms_from_threshold_to_all_rejecting"][key] = {
                "median": round(statistics.median(delays), 2),
                "max": round(max(delays), 2),
            }
    n = max(sizes)
    results["redis_during_failures"] = await traffic(port, "fail", n, seconds, fail=True)
    results["redis_steady"] = await traffic(port, "ok", n, seconds, fail=False)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rate", type=float, default=500, help="fleet-wide calls per second")
    parser.add_argument("--smoke", action="store_true", help="one repetition, for CI")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    clean_environment()
    sizes = [1, 3] if args.smoke else [1, 3, 10]
    repeat = 1 if args.smoke else args.repeat
    seconds = 0.5 if args.smoke else 3.0
    with redis_server() as port:
        result = asyncio.run(run(port, sizes, repeat, args.rate, seconds))
    flush = Config().redis.evidence_flush_seconds
    result["settings"] = {
        "smoke": args.smoke,
        "sizes": sizes,
        "repeat": repeat,
        "rate_calls_per_second": args.rate,
        "failure_threshold": THRESHOLD,
        "evidence_flush_seconds": flush,
        "goal_failed_calls": THRESHOLD + 2 * flush * args.rate,
    }
    result["machine"] = machine()
    result["revision"] = revision()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if result["redis_steady"]["commands_per_call"]:
        sys.exit("steady traffic sent Redis commands")


if __name__ == "__main__":
    main()
