"""Three example gateways (uvicorn processes) under HTTP load while the link to Redis goes silent
(`DelayProxy` blackhole), then comes back: no request fails, latency holds, a breaker opened
through one gateway during the silence reaches Redis and the other two afterwards.

tests/e2e/test_fleet.py already kills Redis under gateway load; this is the other failure mode
of a network, the one that gives no error: connections that stay open and carry nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import httpx
import pytest

from tests.conftest import RedisServer
from tests.e2e.conftest import Gateway, StartGateway, Upstream, make_config
from tests.faults.proxy import DelayProxy
from tests.faults.support import FIGURES, STEADY_CALL_BOUND, quantiles, stored_state
from tests.helpers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

CHANNEL = "circuit_breaker:events"
STEADY_PATHS = ("/sona/status/200", "/auth/status/200")


class HttpLoad:
    """One client per gateway, GETs to closed services, each timed; anything but 200 noted."""

    def __init__(self, client: httpx.AsyncClient, gateways: list[Gateway]) -> None:
        self.client = client
        self.gateways = gateways
        self.phase = "warmup"
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.failed: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> HttpLoad:
        for g, gateway in enumerate(self.gateways):
            for w in range(1):
                self._tasks.append(asyncio.create_task(self._worker(gateway, g + w)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def run_for(self, samples: int) -> None:
        target = len(self.latencies[self.phase]) + samples
        phase = self.phase
        await wait_until(
            lambda: len(self.latencies[phase]) >= target,
            timeout=30,
            interval=0.02,
            message=f"{samples} requests in phase {phase!r}",
        )

    async def _worker(self, gateway: Gateway, n: int) -> None:
        while not self._stop.is_set():
            path = STEADY_PATHS[n % 2]
            n += 1
            phase = self.phase
            started = time.perf_counter()
            try:
                response = await self.client.get(f"{gateway.url}{path}")
            except httpx.HTTPError as exc:
                self.failed.append(f"{phase} {gateway.name} {path}: {exc!r}")
            else:
                self.latencies[phase].append(time.perf_counter() - started)
                if response.status_code != 200:
                    self.failed.append(f"{phase} {gateway.name} {path}: {response.status_code}")
            await asyncio.sleep(0.01)  # pacing: steady load, not waiting for anything


async def logged(gateway: Gateway, text: str, timeout: float = 5.0) -> None:
    await wait_until(
        lambda: text in gateway.output(),
        timeout=timeout,
        interval=0.2,
        message=f"{gateway.name} to log {text!r}",
    )


def rejects_discovery(gateway: Gateway) -> bool:
    response = gateway.get("/discovery/status/200")
    assert response.status_code in (200, 503), response.text
    return response.status_code == 503


async def test_gateways_keep_serving_through_a_silent_link_and_converge(
    redis_server: RedisServer, proxy: DelayProxy, start_gateway: StartGateway, upstream: Upstream
) -> None:
    # (redis_server and proxy come first: the gateways stop, and flush, before they do.)
    config: dict[str, Any] = make_config(upstream.url, timeout_seconds=60)
    config["redis"] = {"sync_interval_seconds": 0.5}
    gateways = [start_gateway(config, redis_url=proxy.url, ready=False) for _ in range(3)]
    for gateway in gateways:
        gateway.wait_ready()
    a, b, c = gateways
    for gateway in gateways:
        for path in ("/discovery/status/200", *STEADY_PATHS):
            assert gateway.get(path).status_code == 200
    admin = redis_server.client()
    await wait_until(
        lambda: admin.pubsub_numsub(CHANNEL)[0][1] == 3, timeout=10, message="3 subscriptions"
    )

    async with (
        httpx.AsyncClient(timeout=10, trust_env=False) as client,
        HttpLoad(client, gateways) as load,
    ):
        await load.run_for(150)
        load.phase = "normal"
        await load.run_for(600)

        load.phase = "blackhole"
        proxy.blackhole()
        for _ in range(3):
            response = await client.get(f"{a.url}/discovery/status/500")
            assert response.status_code == 500
        # Polled slowly: reading the logs competes with the load for this process's CPU.
        await logged(a, "(service=discovery, from=closed, to=open")
        for gateway in gateways:
            await logged(gateway, "in-memory only", timeout=10)
        await load.run_for(600)
        assert stored_state(admin, "circuit_breaker", "discovery") is None  # Redis never heard

        load.phase = "recovery"
        proxy.restore()
        recovered = time.monotonic()
        await wait_until(
            lambda: stored_state(admin, "circuit_breaker", "discovery") == "open",
            timeout=15,
            interval=0.02,
            message="A's transition in Redis",
        )
        for gateway in (b, c):
            await wait_until(
                lambda g=gateway: asyncio.to_thread(rejects_discovery, g),
                timeout=15,
                interval=0.05,
                message=f"{gateway.name} to reject discovery",
            )
        took = time.monotonic() - recovered
        await load.run_for(100)

    assert not load.failed, f"{len(load.failed)} requests failed: {load.failed[:5]}"
    n50, n99 = quantiles(load.latencies["normal"])
    f50, f99 = quantiles(load.latencies["blackhole"])
    bound = STEADY_CALL_BOUND
    FIGURES.append(
        {
            "test": "gateways",
            "fault": "(e) 3 gateways (HTTP), blackholed link",
            "normal_p50_ms": n50 * 1000,
            "normal_p99_ms": n99 * 1000,
            "fault_p50_ms": f50 * 1000,
            "fault_p99_ms": f99 * 1000,
            "bound_ms": bound * 1000,
            "calls_normal": len(load.latencies["normal"]),
            "calls_fault": len(load.latencies["blackhole"]),
            "converge_ms": took * 1000,
        }
    )
    assert f99 <= bound, f"HTTP p99 {f99 * 1000:.1f} ms under the fault, bound {bound * 1000:.1f}"
    a.wait_for_log("Persisted circuit breaker state to Redis (service=discovery, state=open)")
    for gateway in (b, c):
        await logged(gateway, "Restored circuit breaker state from Redis (service=discovery")
        await logged(gateway, "Reconnected to Redis", timeout=15)
