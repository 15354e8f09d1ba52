"""A slow, then silent, network between the instances and Redis (through `DelayProxy`), and a
subscription that silently stops delivering: the periodic re-read heals what pub/sub lost."""

from __future__ import annotations

import logging
import time

import pytest

from gateway_breaker import CircuitState
from tests.conftest import RedisServer
from tests.faults.conftest import StartFleet
from tests.faults.proxy import DelayProxy
from tests.faults.support import (
    FLAPPY,
    PROBE_SERVICE,
    STEADY,
    Traffic,
    connected,
    converge,
    fault_config,
    ok,
    open_breaker,
    stored_state,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.redis

SERVICES = (*STEADY, *FLAPPY, PROBE_SERVICE)
DELAY = 0.025  # per chunk, each way: +50 ms on every round trip


async def test_slow_then_blackholed_network(
    redis_server: RedisServer, proxy: DelayProxy, key_prefix: str, fleet: StartFleet
) -> None:
    managers = await fleet(fault_config(proxy.url, key_prefix), 3)
    a, b, c = managers
    admin = redis_server.client()  # straight to Redis, around the proxy

    async with Traffic(managers, prober=a) as traffic:
        await traffic.warm_up()
        await traffic.run_for(1500)

        traffic.phase = "slow"
        proxy.delay = DELAY
        await traffic.run_for(300)  # the prober's leases now take a slow round trip
        await open_breaker(a, "discovery")
        opened = time.monotonic()
        await wait_until(
            lambda: all(m.get("discovery").state is CircuitState.OPEN for m in (b, c)),
            timeout=5,
            message="the transition to reach B and C over the slow network",
        )
        slow_propagation = time.monotonic() - opened
        await traffic.run_for(1500)
        assert all(connected(m) for m in managers), "a 50 ms round trip is no outage"

        traffic.phase = "blackhole"
        proxy.blackhole()
        await wait_until(
            lambda: not any(connected(m) for m in managers),
            timeout=10,
            message="every instance to give up on the silent network",
        )
        await open_breaker(b, "search")
        await traffic.run_for(1500)

        traffic.phase = "recovery"
        traffic.probing = False
        proxy.restore()
        took = await converge(
            managers,
            admin,
            key_prefix,
            SERVICES,
            extra=lambda: all(stored_state(admin, key_prefix, s) == "open" for s in FLAPPY),
        )

    traffic.check_no_failures()
    traffic.check_probes_bounded("slow")
    traffic.check_probes_bounded("blackhole")
    slow = traffic.check_latency("proxy", f"(e) +{DELAY * 1000:.0f} ms per chunk each way", "slow")
    slow["propagation_ms"] = slow_propagation * 1000
    figures = traffic.check_latency("proxy", "(e) blackhole (proxy drops everything)", "blackhole")
    figures["converge_ms"] = took * 1000
    assert proxy.dropped_bytes > 0


async def test_a_silently_lost_subscription_is_healed_by_the_periodic_reread(
    redis_server: RedisServer, proxy: DelayProxy, key_prefix: str, fleet: StartFleet
) -> None:
    """Only the subscriptions are blackholed: no error, no reconnect, the announcement simply
    never arrives. The other instances still learn of the transition, by the re-read they do
    every `sync_interval_seconds`."""
    interval = 0.5
    config = fault_config(proxy.url, key_prefix, sync_interval_seconds=interval)
    managers = await fleet(config, 3)
    a, b, c = managers
    admin = redis_server.client()
    channel = f"{key_prefix}:events"
    await wait_until(lambda: admin.pubsub_numsub(channel)[0][1] == 3, message="three subscriptions")
    subscriptions = admin.client_list(_type="pubsub")
    assert len(subscriptions) == 3
    proxy.blackhole(int(client["addr"].rsplit(":", 1)[1]) for client in subscriptions)

    await open_breaker(a, "discovery")
    opened = time.monotonic()
    await wait_until(
        lambda: all(m.get("discovery").state is CircuitState.OPEN for m in (b, c)),
        timeout=interval + 2,
        message="B and C to re-read the state pub/sub did not bring",
    )
    took = time.monotonic() - opened
    # The announcement reached the subscriptions' links and was dropped there, and nobody
    # resubscribed (which would have re-read too): the periodic re-read brought it.
    await wait_until(lambda: proxy.dropped_bytes > 0, message="the announcement dropped")
    assert {c["id"] for c in admin.client_list(_type="pubsub")} == {c["id"] for c in subscriptions}
    assert took <= interval + 0.5, f"{took * 1000:.0f} ms with a {interval * 1000:.0f} ms re-read"
    await converge(managers, admin, key_prefix, ["discovery"])
    print(f"healed by the periodic re-read in {took * 1000:.0f} ms (interval {interval} s)")


async def test_a_probe_lease_within_the_bound_on_a_slow_link_is_no_outage(
    redis_server: RedisServer,
    proxy: DelayProxy,
    key_prefix: str,
    fleet: StartFleet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 100 ms round trip is slow, not down: the end of an open period costs one round trip
    (the lease, 100 ms here, within the 250 ms bound), the fleet-wide lease is taken, and no
    instance declares Redis lost. This is the first lease on a fresh Redis (as after any Redis
    restart): nothing about the request path may cost more than that one round trip."""
    a, b = await fleet(fault_config(proxy.url, key_prefix), 2)
    with pytest.raises(Exception, match="on purpose"):
        await a.call(PROBE_SERVICE, _down)
    await wait_until(lambda: b.get(PROBE_SERVICE).state is CircuitState.OPEN, timeout=5)
    await wait_until(lambda: a.get(PROBE_SERVICE).retry_after() == 0, timeout=5)
    proxy.delay = 0.05
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway_breaker"):
        started = time.perf_counter()
        assert await a.call(PROBE_SERVICE, ok) == "ok"
        took = time.perf_counter() - started
        await wait_until(lambda: b.get(PROBE_SERVICE).state is CircuitState.CLOSED, timeout=5)
    outages = [r.getMessage() for r in caplog.records if "in-memory only" in r.getMessage()]
    assert not outages, (
        f"a {took * 1000:.0f} ms probe call over a 100 ms round trip was taken for an outage:"
        f" {outages}"
    )
    assert connected(a)
    assert took < 0.25


def _down() -> None:
    raise RuntimeError("failed on purpose")
