"""Connections cut under load (`CLIENT KILL TYPE normal` and `TYPE pubsub` from an admin client,
over and over), and a connection pool of two (one held by the subscription) with concurrent
probe leases on many services at once."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest

from gateway_breaker import CircuitOpenError, CircuitState
from tests.conftest import RedisServer
from tests.faults.conftest import StartFleet
from tests.faults.support import (
    FLAPPY,
    PROBE_LEASE_BOUND,
    PROBE_LEASE_SLACK,
    PROBE_SERVICE,
    STEADY,
    Traffic,
    UpstreamDown,
    converge,
    down,
    fault_config,
    open_breaker,
    stored,
    stored_state,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.redis

SERVICES = (*STEADY, *FLAPPY, PROBE_SERVICE)


async def test_connections_killed_over_and_over(
    redis_server: RedisServer, key_prefix: str, fleet: StartFleet
) -> None:
    managers = await fleet(fault_config(redis_server.url, key_prefix), 3)
    a, b, c = managers
    admin = redis_server.client()
    killed: Counter[str] = Counter()
    storm = asyncio.Event()

    async def kill_connections() -> None:
        while not storm.is_set():
            for kind in ("normal", "pubsub"):
                killed[kind] += int(admin.client_kill_filter(_type=kind))
            await asyncio.sleep(0.05)  # pacing: twenty rounds of kills a second

    async with Traffic(managers, prober=a) as traffic:
        await traffic.warm_up()
        await traffic.run_for(1500)
        traffic.phase = "fault"
        killer = asyncio.create_task(kill_connections())
        await wait_until(lambda: killed["pubsub"] >= 6, message="subscriptions killed twice")
        await open_breaker(b, "discovery")  # its write races the kills
        await wait_until(lambda: killed["normal"] >= 6, message="data connections killed")
        await open_breaker(c, "search")
        await traffic.run_for(1500)
        await wait_until(lambda: killed["pubsub"] >= 12, message="more subscriptions killed")
        storm.set()
        await killer

        traffic.phase = "recovery"
        traffic.probing = False
        took = await converge(
            managers,
            admin,
            key_prefix,
            SERVICES,
            extra=lambda: all(stored_state(admin, key_prefix, s) == "open" for s in FLAPPY),
        )

    traffic.check_no_failures()
    traffic.check_probes_bounded()
    figures = traffic.check_latency("client-kill", "(c) CLIENT KILL normal+pubsub, 20/s")
    figures["converge_ms"] = took * 1000
    figures["connections_killed"] = dict(killed)
    for manager in managers:
        for service in FLAPPY:
            assert manager.get(service).state is CircuitState.OPEN


async def test_pool_of_two_with_concurrent_probe_leases_on_many_services(
    redis_server: RedisServer, key_prefix: str, fleet: StartFleet
) -> None:
    """30 services half-open at once on three instances: 90 concurrent probe leases, 30 per
    instance through its one free pooled connection (the other is the subscription's).

    Each request still decides within the lease bound, at most one probe per instance per
    service goes out (one for the fleet unless a lease timed out), and every breaker ends
    closed by its probe, everywhere, as Redis says."""
    config = fault_config(redis_server.url, key_prefix, pool_size=2)
    managers = await fleet(config, 3)
    a = managers[0]
    admin = redis_server.client()
    services = [f"svc-{i:02d}" for i in range(30)]  # default policy: 1 failure, 0.1 s open
    for manager in managers:
        for service in services:
            manager.get(service)  # every instance follows every service
    for service in services:
        with pytest.raises(UpstreamDown):
            await a.call(service, down)
    await converge(
        managers,
        admin,
        key_prefix,
        services,
        extra=lambda: all(stored_state(admin, key_prefix, s) == "open" for s in services),
    )
    for manager in managers:
        for service in services:
            await wait_until(
                lambda m=manager, s=service: m.get(s).retry_after() == 0,
                timeout=2,
                message="every open period over",
            )

    probes: Counter[str] = Counter()
    decisions: list[float] = []
    outcomes: Counter[str] = Counter()

    async def upstream(service: str) -> str:
        probes[service] += 1
        await asyncio.sleep(0.05)  # the upstream takes 50 ms: the probe is out meanwhile
        return "ok"

    async def request(manager_index: int, service: str) -> None:
        manager = managers[manager_index]
        started = time.perf_counter()
        probed = False

        async def call() -> str:
            nonlocal probed
            probed = True
            return await upstream(service)

        try:
            await manager.call(service, call)
            outcomes["ok"] += 1
        except CircuitOpenError:
            outcomes["rejected"] += 1
        except Exception as exc:
            outcomes[f"failed: {exc!r}"] += 1
        decisions.append(time.perf_counter() - started - (0.05 if probed else 0))

    async with Traffic(managers) as traffic:
        await traffic.warm_up()
        await traffic.run_for(1500)
        traffic.phase = "fault"
        burst = [request(i, s) for s in services for i in range(len(managers))]
        await asyncio.gather(*burst)
        await traffic.run_for(300)
        traffic.phase = "recovery"

    failed = {k: v for k, v in outcomes.items() if k not in ("ok", "rejected")}
    assert not failed, failed
    traffic.check_no_failures()
    figures = traffic.check_latency("pool", "(d) pool_size 2, 90 concurrent leases")
    figures["probe_max_ms"] = max(decisions) * 1000
    figures["probes"] = dict(Counter(probes.values()))
    assert max(decisions) <= PROBE_LEASE_BOUND + PROBE_LEASE_SLACK, (
        f"a request waited {max(decisions) * 1000:.0f} ms to be admitted or rejected"
    )
    # One prober per instance at most (per-instance limit); fleet-wide one unless a lease
    # timed out waiting for the pool and the instance decided alone.
    assert all(1 <= n <= len(managers) for n in probes.values()), probes

    # Every breaker closed by its probe, everywhere, as Redis says.
    took = await converge(
        managers,
        admin,
        key_prefix,
        services,
        extra=lambda: all(stored_state(admin, key_prefix, s) == "closed" for s in services),
    )
    figures["converge_ms"] = took * 1000


async def test_a_probe_outcome_written_over_an_unseen_half_open_is_not_lost(
    redis_server: RedisServer, key_prefix: str, fleet: StartFleet
) -> None:
    """What the pool test above runs into when the pool is the bottleneck, made deterministic.

    B's half_open write lands in Redis before A has heard of it (its announcement is still on
    the way), and A's probe has already succeeded: A's write of `closed` is rejected by version.
    A half_open of the very period A probed carries nothing new, so A must write its outcome
    on top of it, not adopt it: otherwise the fleet stays half_open, the probe's success lost.
    """
    config = fault_config(redis_server.url, key_prefix, sync_interval_seconds=3600)
    (a,) = await fleet(config, 1)
    admin = redis_server.client()
    key = f"{key_prefix}:{PROBE_SERVICE}:state"
    with pytest.raises(UpstreamDown):
        await a.call(PROBE_SERVICE, down)  # default policy: open for 0.1 s
    await wait_until(lambda: stored_state(admin, key_prefix, PROBE_SERVICE) == "open")
    breaker = a.get(PROBE_SERVICE)
    await wait_until(lambda: breaker.retry_after() == 0, timeout=2)
    opened = stored(admin, key_prefix, PROBE_SERVICE)
    assert opened is not None
    assert breaker.version == opened["version"]
    # B's half_open of the same period, stored; its announcement has not reached A yet.
    admin.set(key, json.dumps({**opened, "state": "half_open", "version": opened["version"] + 1}))

    permit = breaker.acquire()  # A: open -> half_open
    assert permit is not None
    assert permit.probe
    breaker.record(permit, failed=False)  # A's probe succeeded: half_open -> closed
    assert breaker.state is CircuitState.CLOSED

    await wait_until(
        lambda: (
            stored_state(admin, key_prefix, PROBE_SERVICE) == "closed"
            or breaker.state is not CircuitState.CLOSED
        ),
        message="A's write to settle",
    )
    assert breaker.state is CircuitState.CLOSED, "A dropped its probe's outcome"
    assert stored_state(admin, key_prefix, PROBE_SERVICE) == "closed"
