"""Several example gateways under uvicorn sharing one redis-server behave as one breaker.

Every gateway here re-reads Redis only once an hour (`sync_interval_seconds: 3600`), so whatever
reaches another instance within a test reached it by announcement (pub/sub), or by the re-read an
instance does after it (re)subscribes, never by the periodic re-read.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from functools import partial
from typing import Any

import httpx
import pytest

from tests.conftest import RedisServer
from tests.e2e.conftest import Gateway, StartGateway, Upstream, counts, make_config
from tests.helpers import wait_until, wait_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

SERVICES = ("discovery", "sona", "auth")
EVENTS_CHANNEL = "circuit_breaker:events"
# The bound from the issue: generous next to the ~1 ms an announcement takes.
# Only the announcement can move a state this fast: the re-read runs once an hour here. The
# bound leaves a loaded 2-core machine 20x its usual figure (10-40 ms through HTTP); the
# figures themselves are measured by benchmarks/fleet_propagation.py.
PROPAGATION_BOUND_SECONDS = 1.0


def fleet_config(upstream: Upstream, **discovery: Any) -> dict[str, Any]:
    """Every service opens after 3 failures; no periodic re-read within a test's lifetime."""
    config = make_config(upstream.url, **discovery)
    for name in ("sona", "auth"):
        config["circuit_breaker"]["services"][name]["failure_threshold"] = 3
    config["redis"] = {"sync_interval_seconds": 3600}
    return config


def start_fleet(
    start_gateway: StartGateway, redis_server: RedisServer, config: dict[str, Any], n: int
) -> list[Gateway]:
    """`n` gateways started side by side, each warm: it has served every service once and
    subscribed to the fleet's announcements."""
    gateways = [start_gateway(config, redis_url=redis_server.url, ready=False) for _ in range(n)]
    for gateway in gateways:
        gateway.wait_ready()
    for gateway in gateways:
        for service in SERVICES:
            assert gateway.get(f"/{service}/status/200").status_code == 200
    wait_until_sync(
        lambda: subscribers(redis_server) == n,
        timeout=5,
        message=f"{n} gateways subscribed to {EVENTS_CHANNEL}",
    )
    return gateways


def subscribers(redis_server: RedisServer) -> int:
    ((_, count),) = redis_server.client().pubsub_numsub(EVENTS_CHANNEL)
    return int(count)


def stored(redis_server: RedisServer, service: str = "discovery") -> dict[str, Any] | None:
    raw = redis_server.client().get(f"circuit_breaker:{service}:state")
    if raw is None:
        return None
    doc = json.loads(raw)
    assert isinstance(doc, dict)
    return doc


def stored_state(redis_server: RedisServer, service: str = "discovery") -> str | None:
    doc = stored(redis_server, service)
    return None if doc is None else doc["state"]


def redis_now_ms(redis_server: RedisServer) -> int:
    """Now on Redis's clock, the one the fleet times its open periods and leases on."""
    seconds, micros = redis_server.client().time()
    return int(seconds) * 1000 + int(micros) // 1000


def wait_open_period_over(redis_server: RedisServer, timeout_seconds: float) -> None:
    """Without sending a request (which would probe): wait until the stored open period ended.

    50 ms on top, for each instance's estimate of its offset from Redis's clock.
    """
    doc = stored(redis_server)
    assert doc is not None
    assert doc["state"] == "open", doc
    ends_ms = doc["opened_at_ms"] + doc.get("open_ms", round(timeout_seconds * 1000)) + 50
    wait_until_sync(
        lambda: redis_now_ms(redis_server) >= ends_ms,
        timeout=timeout_seconds + 5,
        interval=0.01,
        message="the end of the open period",
    )


def open_through(gateway: Gateway, service: str = "discovery") -> None:
    """Three upstream failures through `gateway`; the third response opened its breaker."""
    for _ in range(3):
        assert gateway.get(f"/{service}/status/500").status_code == 500


def rejects(gateway: Gateway, service: str = "discovery") -> bool:
    response = gateway.get(f"/{service}/status/200")
    assert response.status_code in (200, 503), response.text
    return response.status_code == 503


def lets_through(gateway: Gateway, service: str = "discovery") -> bool:
    return not rejects(gateway, service)


def logged(gateway: Gateway, text: str) -> bool:
    return text in gateway.output()


def assert_rejected_by_breaker(response: httpx.Response, service: str = "discovery") -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["service"] == service
    assert int(response.headers["retry-after"]) >= 1


# -- 1. propagation by announcement ------------------------------------------------------------


def test_a_breaker_opened_on_one_instance_rejects_on_another_by_announcement(
    redis_server: RedisServer, start_gateway: StartGateway, upstream: Upstream
) -> None:
    # (redis_server comes first so that the gateways stop, and flush, before it does.)
    # Long open periods: nothing may probe while B is being polled.
    config = fleet_config(upstream, timeout_seconds=60)
    for name in ("sona", "auth"):
        config["circuit_breaker"]["services"][name]["timeout_seconds"] = 60
    a, b = start_fleet(start_gateway, redis_server, config, 2)

    delays: dict[str, float] = {}
    for service in SERVICES:
        for _ in range(2):
            assert a.get(f"/{service}/status/500").status_code == 500
        assert b.get(f"/{service}/status/200").status_code == 200  # B: still closed
        assert a.get(f"/{service}/status/500").status_code == 500  # this one opens A's breaker
        opened = time.perf_counter()
        # A tight loop over HTTP, no sleeping: B's closed breaker lets each poll through to the
        # upstream until the announcement lands.
        while True:
            response = b.get(f"/{service}/status/200")
            elapsed = time.perf_counter() - opened
            if response.status_code != 200:
                break
            assert elapsed < 5, f"B still lets {service} through {elapsed:.1f}s after A opened it"
        assert_rejected_by_breaker(response, service)
        assert response.json()["state"] == "open"
        delays[service] = elapsed
        assert_rejected_by_breaker(a.get(f"/{service}/status/200"), service)

    print("propagation delays (ms):", {s: round(d * 1000, 2) for s, d in delays.items()})
    slow = {s: f"{d * 1000:.1f} ms" for s, d in delays.items() if d >= PROPAGATION_BOUND_SECONDS}
    assert not slow, f"B rejected later than {PROPAGATION_BOUND_SECONDS * 1000:.0f} ms: {slow}"
    for service in SERVICES:
        assert stored_state(redis_server, service) == "open"


# -- 2. one probe for the whole fleet ----------------------------------------------------------


async def test_a_burst_over_three_instances_sends_exactly_one_probe(
    redis_server: RedisServer, start_gateway: StartGateway, upstream: Upstream
) -> None:
    timeout = 4.0  # B and C learn of the open state well inside it, however busy the machine
    gateways = start_fleet(
        start_gateway, redis_server, fleet_config(upstream, timeout_seconds=timeout), 3
    )
    a, b, c = gateways
    open_through(a)
    for gateway in (b, c):
        wait_until_sync(partial(rejects, gateway), timeout=timeout / 2, interval=0.005)
    wait_open_period_over(redis_server, timeout)

    served = counts(upstream)
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        responses = await asyncio.gather(
            *(client.get(f"{g.url}/discovery/slow/1") for _ in range(8) for g in gateways)
        )
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 1, 503: 23}, statuses
    for response in responses:
        if response.status_code == 503:
            assert_rejected_by_breaker(response)
    assert served() == 1, "exactly one probe may reach the upstream"

    # The probe's success closed the breaker for the whole fleet.
    wait_until_sync(lambda: stored_state(redis_server) == "closed", timeout=2)
    for gateway in gateways:
        wait_until_sync(
            partial(lets_through, gateway),
            timeout=2,
            interval=0.005,
            message=f"{gateway.name} to let discovery through again",
        )


# -- 3. a prober that dies -----------------------------------------------------------------------


async def test_a_dead_probers_slot_frees_when_its_lease_runs_out(
    redis_server: RedisServer, start_gateway: StartGateway, upstream: Upstream
) -> None:
    # Periods long enough for each step to fall inside them on a busy machine: B learns of the
    # open state within the open period, and killing A takes well under the lease.
    timeout = 3.0
    lease = 5
    config = fleet_config(upstream, timeout_seconds=timeout, probe_lease_seconds=lease)
    a, b = start_fleet(start_gateway, redis_server, config, 2)
    probe_key = "circuit_breaker:discovery:probe"
    open_through(b)
    wait_until_sync(lambda: rejects(a), timeout=timeout / 2, interval=0.005)
    wait_open_period_over(redis_server, timeout)

    served = counts(upstream)
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        probe = asyncio.create_task(client.get(f"{a.url}/discovery/slow/5"))
        await wait_until(lambda: served() == 1, timeout=3, message="A's probe at the upstream")
        leases = redis_server.client().zrange(probe_key, 0, -1, withscores=True)
        assert len(leases) == 1, leases
        lease_expires_ms = float(leases[0][1])

        a.process.kill()  # SIGKILL while the probe is in flight: A never reports its outcome
        a.process.wait(5)
        with pytest.raises(httpx.TransportError):
            await probe

        outcomes: list[tuple[int, int]] = []

        async def b_let_one_through() -> bool:
            response = await client.get(f"{b.url}/discovery/status/200")
            outcomes.append((response.status_code, redis_now_ms(redis_server)))
            if response.status_code == 503:
                assert_rejected_by_breaker(response)
            return response.status_code == 200

        await wait_until(b_let_one_through, timeout=lease + 10, interval=0.01, message="B's probe")

    *rejected, (status, passed_at_ms) = outcomes
    assert status == 200
    assert rejected, "B must reject while the dead prober's lease runs"
    assert {s for s, _ in rejected} == {503}
    assert rejected[0][1] < lease_expires_ms, "the first rejection came after the lease ended"
    assert passed_at_ms >= lease_expires_ms, (
        f"B's probe passed {lease_expires_ms - passed_at_ms:.0f} ms before the dead prober's"
        " lease ran out"
    )
    late_ms = passed_at_ms - lease_expires_ms
    print(f"B: {len(rejected)} rejections, then its probe passed {late_ms:.0f} ms after the lease")
    # A peer re-asks within 0.25 s of a lease's end; 2 s leaves a busy machine room and is still
    # far from waiting out another whole lease.
    assert late_ms < 2000, "B must probe soon after the dead prober's lease runs out"
    assert served() == 2, "only A's probe and B's probe may reach the upstream"

    wait_until_sync(lambda: stored_state(redis_server) == "closed", timeout=2)
    for _ in range(3):
        assert b.get("/discovery/status/200").status_code == 200


# -- 4. Redis killed under load ------------------------------------------------------------------


async def test_killing_redis_under_load_fails_no_request_and_the_fleet_heals(
    redis_server: RedisServer, start_gateway: StartGateway, upstream: Upstream
) -> None:
    config = fleet_config(upstream, timeout_seconds=60)  # no probe while the fleet is polled
    gateways = start_fleet(start_gateway, redis_server, config, 3)
    outcomes: list[int | str] = []
    stop = asyncio.Event()

    async def traffic(client: httpx.AsyncClient, gateway: Gateway) -> None:
        n = 0
        while not stop.is_set():
            service = ("sona", "auth")[n % 2]
            n += 1
            try:
                response = await client.get(f"{gateway.url}/{service}/status/200")
            except httpx.HTTPError as exc:
                outcomes.append(f"{gateway.name} /{service}: {exc!r}")
            else:
                outcomes.append(response.status_code)
            await asyncio.sleep(0.01)  # pacing: light traffic, not waiting for anything

    async def served_more(n: int, what: str) -> None:
        target = len(outcomes) + n
        await wait_until(lambda: len(outcomes) >= target, timeout=10, message=what)

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        workers = [asyncio.create_task(traffic(client, g)) for g in gateways]
        await served_more(60, "traffic before the outage")
        await asyncio.to_thread(redis_server.kill)
        for gateway in gateways:
            await wait_until(
                partial(logged, gateway, "event subscription lost"),
                message=f"{gateway.name} to notice Redis is gone",
            )
        await served_more(90, "traffic while Redis is down")
        await asyncio.to_thread(redis_server.start)
        await wait_until(
            lambda: subscribers(redis_server) == len(gateways),
            timeout=10,
            message="every gateway subscribed again",
        )
        await served_more(60, "traffic after Redis returned")
        stop.set()
        await asyncio.gather(*workers)
    duration = time.monotonic() - started

    failed = [o for o in outcomes if o != 200]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed: {failed[:5]}"
    print(f"{len(outcomes)} requests in {duration:.2f}s across the Redis outage, all 200")

    # The fleet is one breaker again: opened through one instance, it rejects on every one.
    a = gateways[0]
    open_through(a)
    for gateway in gateways:
        wait_until_sync(
            partial(rejects, gateway),
            timeout=5,
            interval=0.02,
            message=f"{gateway.name} to reject discovery",
        )
    assert stored_state(redis_server) == "open"
