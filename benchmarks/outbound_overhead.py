"""Per-call cost of BreakerTransport next to a bare httpx.AsyncHTTPTransport.

Two views:

- **Local upstream**: an `httpx.AsyncClient` makes sequential GETs to a minimal ASGI app under
  uvicorn on a loopback port (its own process). Contenders: `bare` (httpx's own transport),
  `guarded` (BreakerTransport around it, fixed service, in-memory manager), `routed` (service
  picked by `route_by_origin`) and `guarded_redis` (a Redis-backed manager, breaker closed: no
  Redis command on a call). Each round runs every contender once in a shuffled order; the
  ratio to `bare` is taken within a round, so the machine's drift cancels out. CPU is this
  process's CPU time per call (the client side; the upstream's process is not counted).
- **Wrapper alone**: `handle_async_request` in a tight loop around an in-process inner
  transport that returns a prepared response at once (`httpx.MockTransport`), with and
  without BreakerTransport: the wrapper's own CPU per call, free of sockets. With
  `--instructions` (needs valgrind), the same loop's instructions per call under cachegrind.

Run:  .venv/bin/python benchmarks/outbound_overhead.py [--rounds N] [--calls N]
                                                      [--instructions] [--json PATH]
CI:   .venv/bin/python benchmarks/outbound_overhead.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _common import (
    bootstrap_ratio_ci,
    clean_environment,
    describe,
    finish,
    free_port,
    machine,
    print_table,
    redis_server,
    summary,
    write_json,
)

CONTENDERS = ("bare", "guarded", "routed", "guarded_redis")
SERVICE = "upstream"
BODY = b"ok"


async def upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The local upstream: 200 and two bytes, for every request."""
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def serve(port: int) -> None:
    import uvicorn

    uvicorn.run(upstream_app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start_upstream() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    script = str(Path(__file__).resolve())
    process = subprocess.Popen([sys.executable, script, "--serve", str(port)])
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.05)


def config_for(url: str, redis_url: str | None = None) -> Any:
    from gateway_breaker import Config

    redis = {"url": redis_url, "key_prefix": "outbound_bench"} if redis_url else {}
    return Config(redis=redis, circuit_breaker={"services": {SERVICE: {"upstream": url}}})


async def timed(call: Callable[[], Awaitable[object]], calls: int) -> tuple[float, float]:
    """Seconds of wall time and of this process's CPU time for `calls` sequential calls."""
    gc.collect()
    gc.disable()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        await call()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    gc.enable()
    return wall, cpu


async def local_upstream(rounds: int, calls: int, redis_url: str) -> dict[str, Any]:
    import httpx

    from gateway_breaker import BreakerTransport, CircuitBreakerManager, route_by_origin

    process, url = start_upstream()
    try:
        memory = CircuitBreakerManager(config_for(url))
        shared = await CircuitBreakerManager.with_redis(config_for(url, redis_url))
        transports: dict[str, httpx.AsyncBaseTransport] = {
            "bare": httpx.AsyncHTTPTransport(),
            "guarded": BreakerTransport(memory, service=SERVICE),
            "routed": BreakerTransport(memory, service=route_by_origin(memory)),
            "guarded_redis": BreakerTransport(shared, service=SERVICE),
        }
        clients = {
            name: httpx.AsyncClient(transport=transport, base_url=url)
            for name, transport in transports.items()
        }

        def getter(client: httpx.AsyncClient) -> Callable[[], Awaitable[object]]:
            return lambda: client.get("/ping")

        for name, client in clients.items():  # warm: connections open, breakers created
            response = await client.get("/ping")
            assert response.status_code == 200, name
            await timed(getter(client), max(10, calls // 10))
        wall: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        cpu: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        order = list(CONTENDERS)
        for _ in range(rounds):
            random.shuffle(order)
            for name in order:
                seconds, cpu_seconds = await timed(getter(clients[name]), calls)
                wall[name].append(seconds / calls)
                cpu[name].append(cpu_seconds / calls)
        for name in ("guarded", "routed", "guarded_redis"):
            assert transports[name].manager.get(SERVICE).calls_success > 0  # type: ignore[attr-defined]
        redis_calls = shared.store_errors  # nothing failed on the store meanwhile
        for client in clients.values():
            await client.aclose()
        await memory.aclose()
        await shared.aclose()
    finally:
        process.terminate()
        process.wait(10)
    results: dict[str, Any] = {"contenders": {}, "ratios": {}, "store_errors": dict(redis_calls)}
    for name in CONTENDERS:
        results["contenders"][name] = {
            "wall_us": {k: v * 1e6 for k, v in summary(wall[name]).items()},
            "cpu_us": {k: v * 1e6 for k, v in summary(cpu[name]).items()},
        }
    for name in CONTENDERS[1:]:
        for kind, samples in (("wall", wall), ("cpu", cpu)):
            per_round = [a / b for a, b in zip(samples[name], samples["bare"], strict=True)]
            low, high = bootstrap_ratio_ci(samples[name], samples["bare"])
            results["ratios"][f"{name}/bare {kind}"] = {
                "of_medians": statistics.median(samples[name]) / statistics.median(samples["bare"]),
                "ci95": [low, high],  # of the ratio of medians, resampling paired rounds
                "median_of_rounds": statistics.median(per_round),
            }
    return results


def wrapper_pair() -> tuple[Any, Any, Any]:
    """The inner in-process transport, the same wrapped, and a request for both."""
    import httpx

    from gateway_breaker import BreakerTransport, CircuitBreakerManager

    response = httpx.Response(200, content=BODY)
    inner = httpx.MockTransport(lambda request: response)
    manager = CircuitBreakerManager(config_for("http://upstream.local"))
    return (
        inner,
        BreakerTransport(manager, service=SERVICE, transport=inner),
        httpx.Request("GET", "http://upstream.local/ping"),
    )


async def wrapper_alone(rounds: int, calls: int) -> dict[str, Any]:
    inner, wrapped, request = wrapper_pair()
    contenders = {"inner": inner, "wrapped": wrapped}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for transport in contenders.values():
        await timed(lambda t=transport: t.handle_async_request(request), calls)
    for _ in range(rounds):
        for name in random.sample(list(contenders), len(contenders)):
            transport = contenders[name]
            _, seconds = await timed(lambda t=transport: t.handle_async_request(request), calls)
            cpu[name].append(seconds / calls)
    overhead = [(w - i) * 1e9 for w, i in zip(cpu["wrapped"], cpu["inner"], strict=True)]
    return {
        "cpu_ns": {name: {k: v * 1e9 for k, v in summary(s).items()} for name, s in cpu.items()},
        "overhead_ns": summary(overhead),
    }


# -- instructions (cachegrind) ------------------------------------------------------------

SHORT, LONG, WARMUP = 2_000, 12_000, 2_000


def child(name: str, calls: int) -> None:
    inner, wrapped, request = wrapper_pair()
    transport = wrapped if name == "wrapped" else inner

    async def run() -> None:
        for _ in range(WARMUP):
            await transport.handle_async_request(request)
        gc.collect()
        gc.disable()
        for _ in range(calls):
            await transport.handle_async_request(request)

    asyncio.run(run())


def instructions() -> dict[str, Any]:
    script = str(Path(__file__).resolve())
    counts: dict[str, float] = {}
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    with tempfile.TemporaryDirectory(prefix="outbound-ir-") as tmp:
        for name in ("inner", "wrapped"):
            totals = []
            for calls in (SHORT, LONG):
                out = Path(tmp) / f"{name}.{calls}.cg"
                command = ["valgrind", "--tool=cachegrind", "--cache-sim=no"]
                command += [f"--cachegrind-out-file={out}", sys.executable, script]
                command += ["--child", name, str(calls)]
                subprocess.run(command, env=env, check=True, capture_output=True, timeout=1800)
                summary_line = next(
                    line for line in out.read_text().splitlines() if line.startswith("summary:")
                )
                totals.append(int(summary_line.split()[1]))
            counts[name] = (totals[1] - totals[0]) / (LONG - SHORT)
    return {
        "per_call": counts,
        "overhead": counts["wrapped"] - counts["inner"],
        "settings": {"short": SHORT, "long": LONG, "warmup": WARMUP},
    }


def report(local: dict[str, Any], alone: dict[str, Any], ir: dict[str, Any] | None) -> None:
    rows = []
    for name in CONTENDERS:
        figures = local["contenders"][name]
        ratio_wall = local["ratios"].get(f"{name}/bare wall")
        ratio_cpu = local["ratios"].get(f"{name}/bare cpu")

        def shown(ratio: dict[str, Any] | None) -> str:
            if ratio is None:
                return "1"
            low, high = ratio["ci95"]
            return f"{ratio['of_medians']:.3f} [{low:.3f}, {high:.3f}]"

        rows.append(
            [
                name,
                f"{figures['wall_us']['median']:.0f}",
                f"{figures['cpu_us']['median']:.0f}",
                shown(ratio_wall),
                shown(ratio_cpu),
            ]
        )
    print_table(
        [
            "contender",
            "wall µs/call",
            "CPU µs/call",
            "wall / bare [95% CI]",
            "CPU / bare [95% CI]",
        ],
        rows,
    )
    print()
    inner, wrapped = alone["cpu_ns"]["inner"]["median"], alone["cpu_ns"]["wrapped"]["median"]
    over = alone["overhead_ns"]
    print_table(
        ["wrapper alone (in-process inner transport)", "CPU ns/call"],
        [
            ["inner transport", f"{inner:,.0f}"],
            ["BreakerTransport around it", f"{wrapped:,.0f}"],
            ["overhead (median of rounds)", f"{over['median']:,.0f} (p25 {over['p25']:,.0f}, "
             f"p75 {over['p75']:,.0f})"],
        ],
    )  # fmt: skip
    if ir is not None:
        print()
        print_table(
            ["instructions per call", "Ir"],
            [
                ["inner transport", f"{ir['per_call']['inner']:,.0f}"],
                ["BreakerTransport around it", f"{ir['per_call']['wrapped']:,.0f}"],
                ["overhead", f"{ir['overhead']:+,.0f}"],
            ],
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=300, help="calls per contender per round")
    parser.add_argument("--instructions", action="store_true", help="cachegrind (valgrind)")
    parser.add_argument("--smoke", action="store_true", help="a few calls: the script works")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    clean_environment()
    if args.serve:
        serve(args.serve)
        return 0
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0
    rounds, calls = (3, 20) if args.smoke else (args.rounds, args.calls)
    if args.instructions and shutil.which("valgrind") is None:
        print("valgrind is not installed: use it without --instructions", file=sys.stderr)
        return 2
    info = machine()
    print(
        f"outbound_overhead: {rounds} rounds x {calls} sequential calls per contender;"
        f" {info['cpu_model']}, {info['nproc']} cores, Python {info['python']},"
        f" commit {describe(info)}"
    )
    with redis_server() as port:
        local = asyncio.run(local_upstream(rounds, calls, f"redis://127.0.0.1:{port}/0"))
    alone = asyncio.run(wrapper_alone(rounds, calls * 20))
    ir = instructions() if args.instructions and not args.smoke else None
    finish(info)
    report(local, alone, ir)
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "outbound_overhead",
                "machine": info,
                "settings": {"rounds": rounds, "calls": calls, "smoke": args.smoke},
                "local_upstream": local,
                "wrapper_alone": alone,
                "instructions": ir,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
