"""BreakerTransport and @protect against real servers: the demo upstream under uvicorn and a
redis-server shared by two managers, as two instances of a service calling out would share it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_breaker import (
    BreakerTransport,
    CircuitBreakerManager,
    CircuitOpenError,
    CircuitState,
    Config,
    route_by_origin,
)
from tests.conftest import RedisServer
from tests.e2e.conftest import ServerProcess, Upstream, clean_env, counts
from tests.helpers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

SERVICE = "discovery"
# The bound for the second instance to reject; the transition usually takes ~1 ms.
PROPAGATION_BOUND_SECONDS = 2.0
# Open periods: long enough that no probe slips into a test's checks on a busy machine.
LONG_OPEN_SECONDS = 60
SHORT_OPEN_SECONDS = 5


def outbound_config(redis_url: str, key_prefix: str, upstream: str, **policy: Any) -> Config:
    discovery = {
        "upstream": f"{upstream}/discovery",
        "failure_threshold": 3,
        "timeout_seconds": 1,
        **policy,
    }
    return Config(
        redis={"url": redis_url, "key_prefix": key_prefix},
        circuit_breaker={
            "services": {SERVICE: discovery, "sona": {"upstream": f"{upstream}/sona"}}
        },
    )


@pytest.fixture
async def fleet(
    redis_shared: RedisServer, key_prefix: str, upstream: Upstream
) -> AsyncIterator[Callable[..., Any]]:
    """`await fleet(n, **policy)`: n managers sharing Redis, each with a guarded client."""
    made: list[tuple[CircuitBreakerManager, httpx.AsyncClient]] = []

    async def start(n: int, **policy: Any) -> list[tuple[CircuitBreakerManager, httpx.AsyncClient]]:
        config = outbound_config(redis_shared.url, key_prefix, upstream.url, **policy)
        for _ in range(n):
            manager = await CircuitBreakerManager.with_redis(config)
            transport = BreakerTransport(manager, service=route_by_origin(manager))
            made.append((manager, httpx.AsyncClient(transport=transport, timeout=30)))
        return made[-n:]

    yield start
    for manager, client in made:
        await client.aclose()
        await manager.aclose()


async def test_three_500s_through_one_instance_reject_the_other_and_nothing_is_sent(
    fleet: Any, upstream: Upstream
) -> None:
    # A long open period: nothing may probe while the test checks the rejections.
    (_, one), (second, two) = await fleet(2, timeout_seconds=LONG_OPEN_SECONDS)
    sent = counts(upstream)
    for _ in range(3):
        assert (await one.get(f"{upstream.url}/discovery/status/500")).status_code == 500
    assert sent() == 3
    await wait_until(
        lambda: second.get(SERVICE).state is CircuitState.OPEN,
        timeout=PROPAGATION_BOUND_SECONDS,
        message="the second instance to see the breaker open",
    )
    for client in (two, one):
        with pytest.raises(CircuitOpenError) as caught:
            await client.get(f"{upstream.url}/discovery/anything")
        assert isinstance(caught.value, httpx.TransportError)
        assert caught.value.service == SERVICE
        assert 0 < caught.value.retry_after <= LONG_OPEN_SECONDS
    assert sent() == 3  # nothing more reached the upstream
    # Another origin path (another service) is not affected.
    assert (await two.get(f"{upstream.url}/sona/status/200")).status_code == 200


async def test_a_cancelled_probe_counts_nothing_and_frees_the_fleets_slot(
    fleet: Any, upstream: Upstream
) -> None:
    (first, one), (_, two) = await fleet(2)
    for _ in range(3):
        await one.get(f"{upstream.url}/discovery/status/500")
    breaker = first.get(SERVICE)
    await wait_until(lambda: breaker.state is CircuitState.OPEN, message="open")
    # Past the open period the first instance's request is the fleet's only probe; it hangs.
    await wait_until(lambda: breaker.retry_after() == 0, timeout=5, message="probe time")
    probe = asyncio.create_task(one.get(f"{upstream.url}/discovery/slow/60"))
    await wait_until(lambda: breaker.state is CircuitState.HALF_OPEN, message="half-open")
    ignored = breaker.calls_ignored
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert breaker.calls_ignored == ignored + 1
    assert breaker.state is CircuitState.HALF_OPEN  # the cancelled call said nothing

    async def other_instance_probes() -> bool:
        try:
            response = await two.get(f"{upstream.url}/discovery/status/200")
        except CircuitOpenError:
            return False  # the slot is still held: ask again
        return response.status_code == 200

    # The slot went back to the fleet: the other instance probes and closes the breaker.
    await wait_until(other_instance_probes, timeout=10, interval=0.05, message="a free slot")
    await wait_until(lambda: breaker.state is CircuitState.CLOSED, message="closed everywhere")


async def test_streamed_response_is_not_buffered_and_a_long_stream_holds_no_probe(
    fleet: Any, upstream: Upstream
) -> None:
    ((manager, client),) = await fleet(1)
    breaker = manager.get(SERVICE)
    for _ in range(3):
        await client.get(f"{upstream.url}/discovery/status/500")
    await wait_until(lambda: breaker.state is CircuitState.OPEN, message="open")
    await wait_until(lambda: breaker.retry_after() == 0, timeout=5, message="probe time")
    # 10,000 lines 50 ms apart: over eight minutes to finish. Buffered, the first line could
    # not arrive within the test's deadline.
    url = f"{upstream.url}/discovery/stream/10000?delay=0.05"
    async with asyncio.timeout(30), client.stream("GET", url) as response:
        assert response.status_code == 200
        lines = response.aiter_lines()
        assert (await anext(lines)).strip()
        # The outcome was recorded with the status: the probe closed the breaker already.
        assert breaker.state is CircuitState.CLOSED
        assert (await client.get(f"{upstream.url}/discovery/status/200")).status_code == 200
        await lines.aclose()
    assert breaker.calls_success == 2


async def test_sync_function_guarded_by_a_breaker_another_instance_opened(
    fleet: Any, upstream: Upstream
) -> None:
    (_, one), (second, _) = await fleet(2, timeout_seconds=SHORT_OPEN_SECONDS)
    ran: list[str] = []

    @second.protect(SERVICE)
    def lookup(name: str) -> str:
        ran.append(name)
        with httpx.Client(timeout=10) as http:
            return http.get(f"{upstream.url}/discovery/{name}").text

    assert '"path"' in await asyncio.to_thread(lookup, "before")  # a worker thread
    for _ in range(3):
        await one.get(f"{upstream.url}/discovery/status/500")
    await wait_until(
        lambda: second.get(SERVICE).state is CircuitState.OPEN,
        timeout=PROPAGATION_BOUND_SECONDS,
        message="the second instance to see the breaker open",
    )
    ran.clear()
    with pytest.raises(CircuitOpenError):
        await asyncio.to_thread(lookup, "from-a-thread")
    with pytest.raises(CircuitOpenError):
        lookup("on-the-loop")  # called on the loop's own thread
    assert ran == []
    # Past the open period a call from a thread is the probe: it takes the fleet's probe lease
    # on the manager's loop, runs, and its success closes the breaker.
    breaker = second.get(SERVICE)
    await wait_until(
        lambda: breaker.retry_after() == 0, timeout=SHORT_OPEN_SECONDS + 10, message="probe time"
    )
    assert '"path"' in await asyncio.to_thread(lookup, "probe")
    await wait_until(lambda: breaker.state is CircuitState.CLOSED, message="closed by the probe")


class NotFound(Exception):
    """The upstream has no such record: an answer, not a fault."""


async def test_protect_ignore_and_fallback_with_a_real_upstream(
    fleet: Any, upstream: Upstream
) -> None:
    ((manager, _),) = await fleet(1, timeout_seconds=LONG_OPEN_SECONDS)
    sent = counts(upstream)

    def cached(code: int) -> str:
        return "cached"

    @manager.protect(SERVICE, fallback=cached, ignore=(NotFound,))
    async def fetch(code: int) -> str:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(f"{upstream.url}/discovery/status/{code}")
        if response.status_code == 404:
            raise NotFound(code)
        response.raise_for_status()
        return "fresh"

    for _ in range(5):
        with pytest.raises(NotFound):
            await fetch(404)
    assert manager.get(SERVICE).state is CircuitState.CLOSED
    assert await fetch(200) == "fresh"
    for _ in range(3):
        with pytest.raises(httpx.HTTPStatusError):
            await fetch(502)
    await wait_until(lambda: manager.get(SERVICE).state is CircuitState.OPEN, message="open")
    before = sent()
    assert await fetch(200) == "cached"
    assert sent() == before  # while open the function did not run


class OutboundExample(ServerProcess):
    """examples/outbound.py under uvicorn."""

    health_path = "/breakers"


@pytest.fixture
def outbound_example(tmp_path: Path, upstream: Upstream) -> Iterator[OutboundExample]:
    env = clean_env(
        {
            "PROFILE_UPSTREAM": f"{upstream.url}/profile",
            "RECOMMENDATIONS_UPSTREAM": f"{upstream.url}/recommendations",
        }
    )
    server = OutboundExample("outbound", "examples.outbound:app", env, tmp_path)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_example_answers_partially_while_one_upstream_is_open(
    outbound_example: OutboundExample, upstream: Upstream
) -> None:
    whole = outbound_example.get("/home/ada").json()
    assert whole["degraded"] == {}
    assert whole["profile"]["path"] == "/profile/users/ada"
    assert whole["recommendations"]["path"] == "/recommendations/for/ada"
    for _ in range(3):
        failing = outbound_example.get("/home/ada", params={"fail": "recommendations"}).json()
        assert failing["degraded"] == {"recommendations": "status 500"}
    assert outbound_example.get("/breakers").json()["recommendations"] == "open"
    sent = counts(upstream)
    partial = outbound_example.get("/home/ada").json()
    assert partial["profile"]["path"] == "/profile/users/ada"
    assert partial["recommendations"] is None
    assert partial["degraded"]["recommendations"].startswith("circuit open")
    assert sent() == 1  # only the profile was asked
