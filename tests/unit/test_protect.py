"""`@manager.protect` and `manager.call(ignore=...)` in memory, with an injected clock."""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading

import pytest

from gateway_breaker import CircuitBreakerManager, CircuitOpenError, CircuitState
from gateway_breaker.protect import ignore_rule
from tests.helpers import FakeClock, wait_until
from tests.unit.support import make_config

SERVICE = "rates"


class Refused(Exception):
    """An answer of the service that says nothing of its health (say, a 404 mapped to this)."""


@pytest.fixture
def manager(clock: FakeClock) -> CircuitBreakerManager:
    config = make_config({SERVICE: {"failure_threshold": 2, "timeout_seconds": 10}})
    return CircuitBreakerManager(config, clock=clock)


def test_ignore_rule_takes_types_tuples_and_predicates() -> None:
    assert ignore_rule(KeyError)(KeyError("x"))
    assert not ignore_rule(KeyError)(ValueError("x"))
    assert ignore_rule((KeyError, ValueError))(ValueError("x"))
    assert not ignore_rule(())(ValueError("x"))
    assert ignore_rule(lambda exc: "gone" in str(exc))(RuntimeError("gone"))
    for bad in ([KeyError], (KeyError, "x"), 3, (int,)):
        with pytest.raises(TypeError, match="ignore"):
            ignore_rule(bad)  # type: ignore[arg-type]


def test_sync_function_stays_sync_and_keeps_its_name(manager: CircuitBreakerManager) -> None:
    @manager.protect(SERVICE)
    def quote(currency: str, *, scale: int = 1) -> float:
        """The rate of `currency`."""
        return 2.0 * scale

    assert not inspect.iscoroutinefunction(quote)
    assert quote.__name__ == "quote"
    assert quote.__doc__ == "The rate of `currency`."
    assert str(inspect.signature(quote)) == "(currency: 'str', *, scale: 'int' = 1) -> 'float'"
    assert quote("EUR", scale=2) == 4.0
    assert manager.get(SERVICE).calls_success == 1


async def test_async_function_stays_async(manager: CircuitBreakerManager) -> None:
    @manager.protect(SERVICE)
    async def quote(currency: str) -> float:
        return 2.0

    assert inspect.iscoroutinefunction(quote)
    assert quote.__wrapped__.__name__ == "quote"  # type: ignore[attr-defined]
    assert await quote("EUR") == 2.0
    assert manager.get(SERVICE).calls_success == 1


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_ignored_errors_never_trip_real_ones_do_fallback_answers(
    manager: CircuitBreakerManager, kind: str
) -> None:
    ran: list[str] = []

    def fallback(currency: str) -> float:
        return -1.0

    def body(currency: str) -> float:
        ran.append(currency)
        if currency == "XXX":
            raise Refused(currency)
        if currency == "ERR":
            raise ConnectionError(currency)
        return 2.0

    if kind == "sync":
        guarded = manager.protect(SERVICE, fallback=fallback, ignore=(Refused,))(body)

        async def quote(currency: str) -> float:
            return guarded(currency)
    else:

        async def body_async(currency: str) -> float:
            return body(currency)

        quote = manager.protect(SERVICE, fallback=fallback, ignore=(Refused,))(body_async)

    breaker = manager.get(SERVICE)
    for _ in range(5):
        with pytest.raises(Refused):
            await quote("XXX")
    assert breaker.state is CircuitState.CLOSED
    assert breaker.calls_ignored == 5
    assert breaker.calls_failure == 0
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await quote("ERR")
    assert breaker.state is CircuitState.OPEN
    ran.clear()
    assert await quote("EUR") == -1.0
    assert ran == []  # the function did not run


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_open_without_fallback_raises(manager: CircuitBreakerManager, kind: str) -> None:
    manager.get(SERVICE).open_locally("test")

    def body() -> int:
        raise AssertionError("must not run")

    async def body_async() -> int:
        raise AssertionError("must not run")

    if kind == "sync":
        with pytest.raises(CircuitOpenError) as caught:
            manager.protect(SERVICE)(body)()
    else:
        with pytest.raises(CircuitOpenError) as caught:
            await manager.protect(SERVICE)(body_async)()
    assert caught.value.service == SERVICE
    assert caught.value.retry_after > 0


async def test_async_function_may_have_an_async_fallback(manager: CircuitBreakerManager) -> None:
    async def cached(currency: str) -> float:
        return 1.5

    @manager.protect(SERVICE, fallback=cached)
    async def quote(currency: str) -> float:
        raise ConnectionError

    for _ in range(2):
        with pytest.raises(ConnectionError):
            await quote("EUR")
    assert await quote("EUR") == 1.5


async def test_predicate_ignore_and_a_failing_predicate(manager: CircuitBreakerManager) -> None:
    def gone(exc: BaseException) -> bool:
        if isinstance(exc, KeyError):
            raise RuntimeError("predicate bug")
        return isinstance(exc, LookupError)

    breaker = manager.get(SERVICE)
    with pytest.raises(IndexError):
        await manager.call(SERVICE, functools.partial(_raise, IndexError()), ignore=gone)
    assert breaker.calls_ignored == 1
    assert breaker.failure_count == 0
    with pytest.raises(KeyError):  # a predicate that fails: a failure, the caller's error kept
        await manager.call(SERVICE, functools.partial(_raise, KeyError()), ignore=gone)
    assert breaker.failure_count == 1


def _raise(exc: BaseException) -> None:
    raise exc


async def test_call_ignore_types(manager: CircuitBreakerManager) -> None:
    breaker = manager.get(SERVICE)
    for _ in range(3):
        with pytest.raises(Refused):
            await manager.call(SERVICE, _raise, Refused(), ignore=Refused)
    assert breaker.state is CircuitState.CLOSED
    assert breaker.calls_ignored == 3


async def test_cancelled_async_call_counts_nothing_and_frees_the_probe(
    manager: CircuitBreakerManager, clock: FakeClock
) -> None:
    breaker = manager.get(SERVICE)
    breaker.open_locally("test")
    clock.advance(11)  # past the open period: the next call is the probe
    started = asyncio.Event()

    @manager.protect(SERVICE)
    async def slow() -> None:
        started.set()
        await asyncio.sleep(60)

    task = asyncio.create_task(slow())
    await started.wait()
    assert breaker.state is CircuitState.HALF_OPEN
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.calls_ignored == 1
    assert await manager.protect(SERVICE)(_answer)() == "ok"  # the probe slot was free
    assert breaker.state is CircuitState.CLOSED


async def _answer() -> str:
    return "ok"


async def test_sync_call_from_a_thread_is_admitted_and_counted_on_the_loop(
    manager: CircuitBreakerManager,
) -> None:
    await manager.start()
    loop_thread = threading.get_ident()
    seen: list[int] = []
    breaker = manager.get(SERVICE)
    # The transition is announced on the thread that recorded the failure that caused it.
    manager.on_transition(lambda event: seen.append(threading.get_ident()))

    @manager.protect(SERVICE)
    def fails() -> None:
        raise ConnectionError

    for _ in range(2):
        with pytest.raises(ConnectionError):
            await asyncio.to_thread(fails)
    await wait_until(lambda: breaker.state is CircuitState.OPEN, message="open")
    await wait_until(lambda: bool(seen), message="the transition announced")
    assert seen == [loop_thread]
    with pytest.raises(CircuitOpenError):
        await asyncio.to_thread(fails)


async def test_an_object_with_an_async_call_is_guarded_as_async(
    manager: CircuitBreakerManager,
) -> None:
    class Fetcher:
        async def __call__(self, key: str) -> str:
            raise ConnectionError(key)

    guarded = manager.protect(SERVICE, fallback=lambda key: "cached")(Fetcher())
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await guarded("k")
    assert await guarded("k") == "cached"


async def test_a_bad_ignore_is_refused_before_the_call(manager: CircuitBreakerManager) -> None:
    ran: list[int] = []
    with pytest.raises(TypeError, match="ignore"):
        await manager.call(SERVICE, ran.append, 1, ignore=[KeyError])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ignore"):
        manager.protect(SERVICE, ignore="KeyError")  # type: ignore[arg-type]
    assert ran == []
