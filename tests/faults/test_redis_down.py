"""Redis gone or frozen under load from three instances: killed and restarted, SIGSTOPped,
`CLIENT PAUSE 2000 ALL`; and two instances that disagree while Redis is away.

Each test measures the steady calls' latency before the fault, keeps traffic (and a prober that
takes probe leases) running through it, makes a transition while Redis cannot hear of it, then
checks that no call failed, the p99 stayed within bounds, the transition reached Redis after
recovery and every instance agrees with what Redis stores.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from gateway_breaker import CircuitState
from tests.conftest import RedisServer
from tests.faults.conftest import StartFleet
from tests.faults.support import (
    FLAPPY,
    PROBE_SERVICE,
    STEADY,
    Traffic,
    connected,
    converge,
    fault_config,
    open_breaker,
    redis_answers,
    stored,
    stored_state,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.redis

SERVICES = (*STEADY, *FLAPPY, PROBE_SERVICE)
NORMAL_CALLS = 1500
FAULT_CALLS = 1500


async def test_redis_killed_and_restarted_empty(
    redis_server: RedisServer, key_prefix: str, fleet: StartFleet
) -> None:
    managers = await fleet(fault_config(redis_server.url, key_prefix), 3)
    a, b, _ = managers
    client = redis_server.client()
    # Stored before the outage; the restart (no persistence) loses it and the fleet puts it back.
    await open_breaker(b, "search")
    await converge(managers, client, key_prefix, SERVICES)

    async with Traffic(managers, prober=a) as traffic:
        await traffic.warm_up()
        await traffic.run_for(NORMAL_CALLS)
        traffic.phase = "fault"
        await asyncio.to_thread(redis_server.kill)
        await wait_until(
            lambda: not any(connected(m) for m in managers),
            timeout=5,
            message="every instance to notice Redis is gone",
        )
        await open_breaker(a, "discovery")  # nobody but A knows, until Redis is back
        await traffic.run_for(FAULT_CALLS)

        traffic.phase = "recovery"
        traffic.probing = False
        await asyncio.to_thread(redis_server.start)
        took = await converge(
            managers,
            client,
            key_prefix,
            SERVICES,
            extra=lambda: stored_state(client, key_prefix, "discovery") == "open",
        )
        await traffic.run_for(500)

    traffic.check_no_failures()
    traffic.check_probes_bounded()
    figures = traffic.check_latency("kill", "(a) redis SIGKILL + restart (empty)")
    figures["converge_ms"] = took * 1000
    traffic.check_latency("kill", "(a) kill: reconnect phase", phase="recovery")
    # A's transition reached Redis, and "search" (lost with the restart) is back.
    doc = stored(client, key_prefix, "discovery")
    assert doc is not None
    assert doc["failure_count"] == 3
    assert abs(doc["opened_at_ms"] / 1000 - (a.get("discovery").opened_at or 0)) < 1
    assert stored_state(client, key_prefix, "search") == "open"
    for manager in managers:
        assert manager.get("discovery").state is CircuitState.OPEN


async def test_redis_sigstopped(
    redis_server: RedisServer, key_prefix: str, fleet: StartFleet
) -> None:
    managers = await fleet(fault_config(redis_server.url, key_prefix), 3)
    a, b, _ = managers
    client = redis_server.client()

    async with Traffic(managers, prober=a) as traffic:
        await traffic.warm_up()
        await traffic.run_for(NORMAL_CALLS)
        traffic.phase = "fault"
        redis_server.pause()  # SIGSTOP: connections stay open, nothing answers
        await wait_until(
            lambda: not any(connected(m) for m in managers),
            timeout=5,
            message="every instance to give up on the frozen Redis",
        )
        await open_breaker(b, "discovery")
        await traffic.run_for(FAULT_CALLS)

        traffic.phase = "recovery"
        traffic.probing = False
        redis_server.resume()
        took = await converge(
            managers,
            client,
            key_prefix,
            SERVICES,
            extra=lambda: stored_state(client, key_prefix, "discovery") == "open",
        )
        await traffic.run_for(500)

    traffic.check_no_failures()
    traffic.check_probes_bounded()
    figures = traffic.check_latency("sigstop", "(b) redis SIGSTOP / SIGCONT")
    figures["converge_ms"] = took * 1000
    traffic.check_latency("sigstop", "(b) SIGSTOP: reconnect phase", phase="recovery")
    for manager in managers:
        assert manager.get("discovery").state is CircuitState.OPEN


async def test_client_pause_all(
    redis_server: RedisServer, key_prefix: str, fleet: StartFleet
) -> None:
    managers = await fleet(fault_config(redis_server.url, key_prefix), 3)
    a, _, c = managers
    admin = redis_server.client()
    quick = redis.Redis(port=redis_server.port, socket_timeout=0.05, socket_connect_timeout=0.5)

    async with Traffic(managers, prober=a) as traffic:
        await traffic.warm_up()
        await traffic.run_for(NORMAL_CALLS)
        traffic.phase = "fault"
        assert admin.execute_command("CLIENT", "PAUSE", 2000, "ALL")
        pause_ends = time.monotonic() + 2.0
        await open_breaker(c, "discovery")
        await wait_until(
            lambda: asyncio.to_thread(redis_answers, quick),
            timeout=10,
            interval=0.05,
            message="the end of CLIENT PAUSE",
        )
        traffic.phase = "recovery"
        traffic.probing = False
        await converge(
            managers,
            admin,
            key_prefix,
            SERVICES,
            extra=lambda: stored_state(admin, key_prefix, "discovery") == "open",
        )
        took = time.monotonic() - pause_ends
        await traffic.run_for(500)

    traffic.check_no_failures()
    traffic.check_probes_bounded()
    figures = traffic.check_latency("client-pause", "(b) CLIENT PAUSE 2000 ALL")
    figures["converge_ms"] = took * 1000
    for manager in managers:
        assert manager.get("discovery").state is CircuitState.OPEN


async def test_conflicting_transitions_while_redis_is_away_settle_on_one(
    redis_server: RedisServer, key_prefix: str, fleet: StartFleet
) -> None:
    """A's probe closes the breaker, B's reopens it, neither can tell Redis: the first outcome
    written after recovery wins (compare-and-set on the version both last saw) and the other
    instance adopts it. The other outcome is discarded: it was decided on stale knowledge."""
    managers = await fleet(fault_config(redis_server.url, key_prefix), 3)
    a, b, c = managers
    client = redis_server.client()
    service = PROBE_SERVICE  # default policy here: one failure opens it for 0.1 s
    with pytest.raises(Exception, match="on purpose"):
        await a.call(service, _down)
    await converge(managers, client, key_prefix, [service])
    before = stored(client, key_prefix, service)
    assert before is not None
    assert before["state"] == "open"

    redis_server.pause()
    for m in (a, b):
        await wait_until(lambda m=m: m.get(service).retry_after() == 0, timeout=2)
    assert await a.call(service, _ok) == "ok"  # A: half_open -> closed
    with pytest.raises(Exception, match="on purpose"):
        await b.call(service, _down)  # B: half_open -> open again, a new period
    assert a.get(service).state is CircuitState.CLOSED
    assert b.get(service).state is CircuitState.OPEN
    b_opened_at = b.get(service).opened_at
    redis_server.resume()

    await converge(managers, client, key_prefix, [service])
    doc = stored(client, key_prefix, service)
    assert doc is not None
    # A write that timed out while Redis was frozen may still run once it thaws (it sat in the
    # socket buffer): a stale half_open in between is fine, the compare-and-set orders them.
    assert doc["version"] > before["version"]
    assert doc["state"] in ("open", "closed"), doc
    # Exactly one of the two decisions reached Redis; the other lost the compare-and-set and
    # was dropped, not written on top. The history (appended by the same script) says whose.
    winner, loser = (b, a) if doc["state"] == "open" else (a, b)
    history = await a.history(service, limit=20)
    written = [e for e in history if e.version > before["version"]]
    writers = {e.instance for e in written if e.to_state in ("open", "closed")}
    assert winner.instance_id in writers, written
    assert loser.instance_id not in writers, written
    if doc["state"] == "open":  # B's won: its new period, not the old one
        assert b_opened_at is not None
        assert abs(doc["opened_at_ms"] / 1000 - b_opened_at) < 0.01
    assert {m.get(service).state.value for m in (a, b, c)} == {doc["state"]}


async def _ok() -> str:
    return "ok"


def _down() -> None:
    raise RuntimeError("failed on purpose")
