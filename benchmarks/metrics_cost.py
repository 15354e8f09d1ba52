"""What metrics cost: the request path with metrics on vs off, a scrape, a transition's history.

1. Request path: CircuitBreakerMiddleware in front of a raw ASGI app, breaker closed, with
   `metrics.enabled` false and true; both run in every round in a shuffled order and the ratio
   is on/off of the medians (goal: within 2%). With valgrind, also instructions per request
   (cachegrind, the difference between a long and a short run, as in instructions.py).
2. Scrape: `generate_latest` of a registry holding `BreakerCollector` for 1,000 services.
3. History: the Redis commands one transition costs, seen by MONITOR: round trips from the
   gateway, and commands run inside the Lua script (the state write, the history XADD and the
   PUBLISH). Goal: no extra round trip for history.

Run:  .venv/bin/python benchmarks/metrics_cost.py [--rounds N] [--requests N] [--json PATH]
CI:   .venv/bin/python benchmarks/metrics_cost.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import (
    bootstrap_ratio_ci,
    clean_environment,
    describe,
    finish,
    machine,
    print_table,
    redis_server,
    write_json,
)
from asgi_overhead import Sink, fastapi_app, make_scope, timed_batch
from prometheus_client import CollectorRegistry, generate_latest
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway_breaker import CircuitBreakerManager, CircuitBreakerMiddleware, Config
from gateway_breaker.metrics import BreakerCollector, text_format

GOAL_RATIO = 1.02  # request time with metrics on / off: at most this
SERVICE = "svc"
SHORT, LONG, WARMUP = 200, 1_200, 300


async def inner_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def config(metrics: bool) -> Config:
    return Config(
        circuit_breaker={"services": {SERVICE: {}, **{f"svc{i}": {} for i in range(1, 10)}}},
        metrics={"enabled": metrics},
    )


MODES = ("off", "on", "fastapi_off", "fastapi_on")
PAIRS = {"raw ASGI app": ("off", "on"), "FastAPI app": ("fastapi_off", "fastapi_on")}


def build(mode: str) -> ASGIApp:
    """The middleware with metrics off or on, before a raw ASGI app or a FastAPI route."""
    metrics = mode.endswith("on")
    if mode.startswith("fastapi"):
        return fastapi_app([Middleware(CircuitBreakerMiddleware, config=config(metrics))])
    return CircuitBreakerMiddleware(inner_app, config=config(metrics))


async def check(app: ASGIApp, metrics: bool) -> None:
    sink = Sink()
    await app(make_scope(f"/{SERVICE}/ping"), _receive, sink)
    assert sink.status == 200, sink.status
    sink = Sink()
    await app(make_scope("/metrics"), _receive, sink)
    assert (b"gateway_breaker_state" in sink.body) is metrics, sink.body[:200]


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


# -- 1. the request path -----------------------------------------------------------------------


async def request_path(rounds: int, requests: int) -> dict[str, Any]:
    apps = {mode: build(mode) for mode in MODES}
    for name, app in apps.items():
        await check(app, name.endswith("on"))
    scope = make_scope(f"/{SERVICE}/ping")
    for app in apps.values():
        await timed_batch(app, scope, requests)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(rounds):
        order = list(apps)
        random.shuffle(order)
        for name in order:
            gc.collect()
            gc.disable()
            elapsed = await timed_batch(apps[name], scope, requests)
            gc.enable()
            times[name].append(elapsed / requests)
    pairs = {}
    for label, (off, on) in PAIRS.items():
        low, high = bootstrap_ratio_ci(times[on], times[off])
        pairs[label] = {
            "ratio_on_off": statistics.median(times[on]) / statistics.median(times[off]),
            "ratio_ci95": [low, high],
            "verdict": verdict(low, high),
        }
    return {
        "ns_per_request": {name: statistics.median(values) for name, values in times.items()},
        "pairs": pairs,
        "goal": GOAL_RATIO,
    }


def verdict(low: float, high: float) -> str:
    if high <= GOAL_RATIO:
        return "met"
    return "not met" if low > GOAL_RATIO else "unclear (noise wider than the goal)"


def child(mode: str, requests: int, warmup: int) -> None:
    async def run() -> None:
        app = build(mode)
        await check(app, mode.endswith("on"))
        scope = make_scope(f"/{SERVICE}/ping")
        await timed_batch(app, scope, warmup)
        gc.collect()
        gc.disable()
        await timed_batch(app, scope, requests)

    asyncio.run(run())


def instructions(workdir: Path) -> dict[str, Any] | None:
    if shutil.which("valgrind") is None:
        return None
    counts: dict[str, dict[int, int]] = {mode: {} for mode in MODES}
    for mode in counts:
        for requests in (SHORT, LONG):
            out = workdir / f"{mode}.{requests}.cg"
            command = [
                "valgrind", "--tool=cachegrind", "--cache-sim=no",
                f"--cachegrind-out-file={out}",
                sys.executable, str(Path(__file__).resolve()),
                "--child", mode, str(requests), str(WARMUP),
            ]  # fmt: skip
            env = {**os.environ, "PYTHONHASHSEED": "0"}
            subprocess.run(command, capture_output=True, env=env, check=True, timeout=1_800)
            summary = next(
                line for line in out.read_text().splitlines() if line.startswith("summary:")
            )
            counts[mode][requests] = int(summary.split()[1])
    per_request = {
        mode: (values[LONG] - values[SHORT]) / (LONG - SHORT) for mode, values in counts.items()
    }
    ratios = {label: per_request[on] / per_request[off] for label, (off, on) in PAIRS.items()}
    return {"per_request": per_request, "ratio_on_off": ratios}


# -- 2. a scrape with 1,000 services -----------------------------------------------------------


async def scrape(services: int, repeats: int) -> dict[str, Any]:
    """One scrape: the middleware's own (text_format) and prometheus-client's generate_latest."""
    names = [f"service{i:04d}" for i in range(services)]
    manager = CircuitBreakerManager(Config(circuit_breaker={"services": {n: {} for n in names}}))
    await manager.start()
    for name in names:
        for _ in range(3):
            await manager.call(name, lambda: None)
    collector = BreakerCollector(manager)
    registry = CollectorRegistry()
    registry.register(collector)
    body = text_format(collector)
    ways = {
        "text_format": lambda: text_format(collector),
        "generate_latest": lambda: generate_latest(registry),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, way in ways.items():  # alternated, so drift hits both alike
            start = time.perf_counter()
            way()
            times[name].append(time.perf_counter() - start)
    await manager.aclose()
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    ms = {name: statistics.median(values) * 1000 for name, values in times.items()}
    return {
        "services": services,
        "series": series,
        "bytes": len(body),
        "ms_median": ms,
        "generate_latest_over_text_format": ms["generate_latest"] / ms["text_format"],
    }


# -- 3. the Redis commands of one transition ---------------------------------------------------


async def history_cost() -> dict[str, Any]:
    import redis

    with redis_server() as port:
        url = f"redis://127.0.0.1:{port}/0"
        cfg = Config(
            redis={"url": url, "sync_interval_seconds": 3600},  # no periodic re-read meanwhile
            circuit_breaker={"services": {SERVICE: {"failure_threshold": 3}}},
        )
        manager = await CircuitBreakerManager.with_redis(cfg)
        watcher = redis.Redis(port=port)
        seen: list[tuple[str, str]] = []  # (client type, command)
        stop = threading.Event()

        def monitor() -> None:
            with watcher.monitor() as m:
                for entry in m.listen():
                    seen.append((entry["client_type"], entry["command"].split()[0].upper()))
                    if stop.is_set():
                        return

        thread = threading.Thread(target=monitor, daemon=True)
        thread.start()
        await asyncio.sleep(0.3)  # MONITOR is subscribed before the transition
        seen.clear()

        def fail() -> None:
            raise RuntimeError("upstream down")

        for _ in range(3):
            with contextlib.suppress(RuntimeError):
                await manager.call(SERVICE, fail)
        key = f"circuit_breaker:{SERVICE}:state"
        poll = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while b'"open"' not in (poll.get(key) or b"") and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # the write happens in the manager's background task
        history = poll.xlen(f"circuit_breaker:{SERVICE}:history")
        await asyncio.sleep(0.3)  # let the write's own commands reach MONITOR
        stop.set()
        poll.ping()  # wakes the monitor loop so it sees `stop`
        await manager.aclose()
    from_gateway: dict[str, int] = {}
    in_script: dict[str, int] = {}
    setup: dict[str, int] = {}
    for client_type, command in seen:
        if command in ("GET", "XLEN", "PING"):
            continue  # this script's own polling
        if command in ("HELLO", "CLIENT", "AUTH", "SELECT"):
            target = setup  # a new pooled connection's handshake, not the transition's
        else:
            target = in_script if client_type == "lua" else from_gateway
        target[command] = target.get(command, 0) + 1
    return {
        "round_trips_from_gateway": from_gateway,
        "commands_inside_the_script": in_script,
        "connection_setup": setup,
        "history_entries": history,
        "extra_round_trips_for_history": from_gateway.get("XADD", 0),
    }


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--services", type=int, default=1_000)
    parser.add_argument("--smoke", action="store_true", help="a few requests, for CI")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # MODE REQUESTS WARMUP
    args = parser.parse_args(argv)
    clean_environment()
    if args.child:
        mode, requests, warmup = args.child
        child(mode, int(requests), int(warmup))
        return 0
    rounds, requests = (3, 200) if args.smoke else (args.rounds, args.requests)
    services, repeats = (50, 3) if args.smoke else (args.services, 30)
    info = machine()
    print(f"metrics_cost: {info['cpu_model']}, Python {info['python']}, commit {describe(info)}")
    path = asyncio.run(request_path(rounds, requests))
    with tempfile.TemporaryDirectory() as workdir:
        counted = None if args.smoke else instructions(Path(workdir))
    scraped = asyncio.run(scrape(services, repeats))
    history = asyncio.run(history_cost())
    finish(info)

    ns = path["ns_per_request"]
    rows = []
    for label, (off, on) in PAIRS.items():
        pair = path["pairs"][label]
        low, high = pair["ratio_ci95"]
        times = f"{ns[off] / 1000:.2f} / {ns[on] / 1000:.2f} us"
        rows.append([f"{label}: time per request off / on", times, ""])
        ci = f"95% CI {low:.3f}-{high:.3f}; goal <= {GOAL_RATIO}: {pair['verdict']}"
        rows.append([f"{label}: time on / off", f"{pair['ratio_on_off']:.3f}", ci])
        if counted is not None:
            per = counted["per_request"]
            both = f"{per[off]:,.0f} / {per[on]:,.0f}"
            rows.append([f"{label}: instructions per request off / on", both, ""])
            ratio = counted["ratio_on_off"][label]
            rows.append(
                [f"{label}: instructions on / off", f"{ratio:.4f}", f"goal <= {GOAL_RATIO}"]
            )
    size = f"{scraped['series']} series, {scraped['bytes'] / 1024:.0f} KiB"
    ms = scraped["ms_median"]
    label = f"scrape, {scraped['services']} services"
    rows.append([f"{label}: /metrics", f"{ms['text_format']:.1f} ms median", size])
    slower = f"{scraped['generate_latest_over_text_format']:.1f}x the /metrics time"
    rows.append([f"{label}: generate_latest", f"{ms['generate_latest']:.1f} ms median", slower])
    inside = f"inside the script: {history['commands_inside_the_script']}"
    rows.append(["one transition: round trips", str(history["round_trips_from_gateway"]), inside])
    extra = str(history["extra_round_trips_for_history"])
    written = f"history entries written: {history['history_entries']}"
    rows.append(["extra round trips for history", extra, written])
    print_table(["measure", "value", "note"], rows)
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "metrics_cost",
                "machine": info,
                "settings": {"smoke": args.smoke, "rounds": rounds, "requests": requests},
                "request_path": path,
                "instructions": counted,
                "scrape": scraped,
                "history": history,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
