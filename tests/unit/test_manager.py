"""CircuitBreakerManager in memory: call(), rejection, cancellation, breakers by name."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway_breaker import (
    CircuitBreaker,
    CircuitBreakerManager,
    CircuitOpenError,
    CircuitState,
    Config,
    GatewayBreakerError,
    Permit,
)
from tests.helpers import FakeClock, wait_until
from tests.unit.support import make_config

SERVICE = "sona"


@pytest.fixture
def config() -> Config:
    return make_config(
        {
            SERVICE: {
                "failure_threshold": 2,
                "timeout_seconds": 10,
                "half_open_max_calls": 1,
                "success_threshold": 1,
            }
        }
    )


@pytest.fixture
def manager(config: Config, clock: FakeClock) -> CircuitBreakerManager:
    return CircuitBreakerManager(config, clock=clock)


class Boom(Exception):
    pass


def boom() -> None:
    raise Boom("upstream down")


async def aboom() -> None:
    raise Boom("upstream down")


async def open_it(manager: CircuitBreakerManager, service: str = SERVICE) -> None:
    for _ in range(manager.get(service).policy.failure_threshold):
        with pytest.raises(Boom):
            await manager.call(service, boom)
    assert manager.get(service).state is CircuitState.OPEN


async def half_open_it(manager: CircuitBreakerManager, clock: FakeClock) -> None:
    await open_it(manager)
    clock.advance(manager.get(SERVICE).policy.timeout_seconds)


class Blocker:
    """An async callable that starts, then waits until the test lets it go (or cancels it)."""

    def __init__(self) -> None:
        self.started = False
        self.release = asyncio.Event()

    async def __call__(self) -> str:
        self.started = True
        await self.release.wait()
        return "finished"


# -- results and exceptions ------------------------------------------------------------------


async def test_call_returns_the_result_of_a_sync_callable(manager: CircuitBreakerManager) -> None:
    assert await manager.call(SERVICE, lambda: 42) == 42


async def test_call_returns_the_result_of_an_async_callable(
    manager: CircuitBreakerManager,
) -> None:
    async def fetch(x: int, *, y: int) -> tuple[int, int]:
        return x, y

    assert await manager.call(SERVICE, fetch, 1, y=2) == (1, 2)


async def test_call_passes_arguments_to_a_sync_callable(manager: CircuitBreakerManager) -> None:
    def add(a: int, b: int = 0) -> int:
        return a + b

    assert await manager.call(SERVICE, add, 2, b=3) == 5


@pytest.mark.parametrize("fn", [boom, aboom])
async def test_call_reraises_and_counts_exceptions(manager: CircuitBreakerManager, fn: Any) -> None:
    with pytest.raises(Boom, match="upstream down"):
        await manager.call(SERVICE, fn)
    assert manager.get(SERVICE).failure_count == 1
    assert manager.get(SERVICE).state is CircuitState.CLOSED
    with pytest.raises(Boom):
        await manager.call(SERVICE, fn)
    assert manager.get(SERVICE).state is CircuitState.OPEN


async def test_successes_reset_the_failure_count(manager: CircuitBreakerManager) -> None:
    with pytest.raises(Boom):
        await manager.call(SERVICE, boom)
    assert await manager.call(SERVICE, lambda: "ok") == "ok"
    with pytest.raises(Boom):
        await manager.call(SERVICE, boom)
    assert manager.get(SERVICE).state is CircuitState.CLOSED


# -- open ------------------------------------------------------------------------------------


async def test_open_breaker_raises_circuit_open_error_without_calling(
    manager: CircuitBreakerManager, clock: FakeClock
) -> None:
    await open_it(manager)
    calls = 0

    def fn() -> str:
        nonlocal calls
        calls += 1
        return "called"

    clock.advance(3)
    with pytest.raises(CircuitOpenError) as info:
        await manager.call(SERVICE, fn)
    assert calls == 0
    assert info.value.service == SERVICE
    assert info.value.retry_after == pytest.approx(7)
    assert isinstance(info.value, GatewayBreakerError)
    assert SERVICE in str(info.value)


async def test_open_breaker_does_not_await_async_fn(
    manager: CircuitBreakerManager,
) -> None:
    await open_it(manager)
    created = False

    async def fn() -> None:
        nonlocal created
        created = True

    with pytest.raises(CircuitOpenError):
        await manager.call(SERVICE, fn)
    assert created is False


async def test_after_the_timeout_a_probe_closes_the_breaker(
    manager: CircuitBreakerManager, clock: FakeClock
) -> None:
    await half_open_it(manager, clock)
    assert await manager.call(SERVICE, lambda: "probe") == "probe"
    assert manager.get(SERVICE).state is CircuitState.CLOSED


async def test_failed_probe_reopens(manager: CircuitBreakerManager, clock: FakeClock) -> None:
    await half_open_it(manager, clock)
    with pytest.raises(Boom):
        await manager.call(SERVICE, boom)
    assert manager.get(SERVICE).state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        await manager.call(SERVICE, lambda: None)


async def test_half_open_rejects_while_the_probe_is_out(
    manager: CircuitBreakerManager, clock: FakeClock
) -> None:
    await half_open_it(manager, clock)
    blocker = Blocker()
    probe: asyncio.Task[str] = asyncio.create_task(manager.call(SERVICE, blocker))
    await wait_until(lambda: blocker.started, message="probe started")
    with pytest.raises(CircuitOpenError) as info:
        await manager.call(SERVICE, lambda: None)
    assert info.value.retry_after >= 0
    blocker.release.set()
    assert await probe == "finished"
    assert manager.get(SERVICE).state is CircuitState.CLOSED


# -- cancellation ----------------------------------------------------------------------------


async def test_cancellation_is_not_counted(manager: CircuitBreakerManager) -> None:
    breaker = manager.get(SERVICE)
    for _ in range(5):  # more than failure_threshold
        blocker = Blocker()
        task: asyncio.Task[str] = asyncio.create_task(manager.call(SERVICE, blocker))
        await wait_until(lambda b=blocker: b.started, message="call started")  # type: ignore[misc]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert breaker.state is CircuitState.CLOSED
    assert breaker.failure_count == 0
    assert breaker.success_count == 0


async def test_cancelled_probe_frees_its_half_open_slot(
    manager: CircuitBreakerManager, clock: FakeClock
) -> None:
    await half_open_it(manager, clock)
    breaker = manager.get(SERVICE)
    blocker = Blocker()
    task: asyncio.Task[str] = asyncio.create_task(manager.call(SERVICE, blocker))
    await wait_until(lambda: blocker.started, message="probe started")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state is CircuitState.HALF_OPEN
    # The slot is free again: the next call is the probe, and it closes the breaker.
    assert await manager.call(SERVICE, lambda: "probe") == "probe"
    assert manager.get(SERVICE).state is CircuitState.CLOSED


class SlowLeaseManager(CircuitBreakerManager):
    """A manager whose fleet-wide probe lease takes a while (as a Redis round trip does)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.leasing = False
        self.lease_granted = asyncio.Event()

    async def lease_probe(self, breaker: CircuitBreaker, permit: Permit) -> bool:
        self.leasing = True
        await self.lease_granted.wait()
        return True


async def test_cancelled_while_leasing_the_probe_frees_its_half_open_slot(
    config: Config, clock: FakeClock
) -> None:
    manager = SlowLeaseManager(config, clock=clock)
    await half_open_it(manager, clock)
    breaker = manager.get(SERVICE)
    called = False

    def fn() -> None:
        nonlocal called
        called = True

    task = asyncio.create_task(manager.call(SERVICE, fn))
    await wait_until(lambda: manager.leasing, message="probe lease requested")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert called is False
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.acquire() is not None, "the cancelled call kept the half-open probe slot"


# -- breakers by name ------------------------------------------------------------------------


async def test_get_returns_the_same_breaker(manager: CircuitBreakerManager) -> None:
    breaker = manager.get(SERVICE)
    assert manager.get(SERVICE) is breaker
    await manager.call(SERVICE, lambda: None)
    assert manager.get(SERVICE) is breaker
    assert manager.breakers() == {SERVICE: breaker}


async def test_call_uses_the_breaker_get_returns(manager: CircuitBreakerManager) -> None:
    with pytest.raises(Boom):
        await manager.call("auth", boom)
    assert manager.get("auth").failure_count == 1


def test_get_uses_the_services_policy_or_the_defaults() -> None:
    config = make_config(
        {SERVICE: {"failure_threshold": 7}}, defaults={"failure_threshold": 3, "min_calls": 4}
    )
    manager = CircuitBreakerManager(config)
    assert manager.get(SERVICE).policy.failure_threshold == 7
    assert manager.get(SERVICE).policy.min_calls == 4
    assert manager.get("other").policy.failure_threshold == 3
    assert isinstance(manager.get("other"), CircuitBreaker)
    assert manager.get("other").state is CircuitState.CLOSED
    assert manager.get("other").state == "closed"


def test_breakers_of_different_services_are_independent() -> None:
    manager = CircuitBreakerManager(make_config({}, defaults={"failure_threshold": 1}))
    a, b = manager.get("a"), manager.get("b")
    a.record(a.acquire(), failed=True)  # type: ignore[arg-type]
    assert a.state is CircuitState.OPEN
    assert b.state is CircuitState.CLOSED


@pytest.mark.parametrize("name", ["bad name", "a/b", ""])
def test_invalid_service_name_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="service name"):
        CircuitBreakerManager(Config()).get(name)


async def test_new_builds_an_in_memory_manager(config: Config) -> None:
    manager = CircuitBreakerManager.new(config)
    assert isinstance(manager, CircuitBreakerManager)
    assert manager.config is config
    assert manager.shared is False
    assert await manager.call(SERVICE, lambda: "ok") == "ok"
    await manager.aclose()


def test_manager_without_config_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIRCUIT_BREAKER__SERVICES__AUTH__FAILURE_THRESHOLD", "4")
    manager = CircuitBreakerManager.new()
    assert manager.get("auth").policy.failure_threshold == 4


async def test_context_manager_starts_configured_services(config: Config) -> None:
    async with CircuitBreakerManager(config) as manager:
        assert set(manager.breakers()) == {SERVICE}
        assert manager.shared is False


async def test_with_redis_needs_a_url(config: Config) -> None:
    with pytest.raises(GatewayBreakerError, match=r"redis\.url"):
        await CircuitBreakerManager.with_redis(config)
