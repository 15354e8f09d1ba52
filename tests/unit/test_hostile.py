"""Hostile input that needs no server: stored states that try to hold a breaker open."""

from __future__ import annotations

from gateway_breaker import BreakerSnapshot, CircuitBreaker, CircuitState
from tests.helpers import FakeClock
from tests.unit.support import make_policy


def test_a_stored_open_period_is_clamped_to_the_policy() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("svc", make_policy(timeout_seconds=5), clock=clock)
    # Opened far in the future, for a day: the policy allows 5 seconds from now at most.
    breaker.restore(
        BreakerSnapshot(CircuitState.OPEN, opened_at=clock.now + 10**9, open_seconds=86_400)
    )
    assert breaker.state is CircuitState.OPEN
    assert 0 < breaker.retry_after() <= 5
    clock.advance(5)
    assert breaker.acquire() is not None


def test_a_stored_backoff_period_is_clamped_to_max_timeout() -> None:
    clock = FakeClock()
    policy = make_policy(timeout_seconds=2, max_timeout_seconds=30)
    breaker = CircuitBreaker("svc", policy, clock=clock)
    breaker.restore(BreakerSnapshot(CircuitState.OPEN, opened_at=clock.now, open_seconds=3600))
    assert breaker.retry_after() == 30
    breaker.restore(BreakerSnapshot(CircuitState.OPEN, opened_at=clock.now, open_seconds=0.001))
    assert breaker.retry_after() == 2


def half_open(clock: FakeClock, **policy: object) -> CircuitBreaker:
    breaker = CircuitBreaker("svc", make_policy(failure_threshold=1, **policy), clock=clock)
    breaker.record(breaker.acquire(), failed=True)  # type: ignore[arg-type]
    clock.advance(breaker.policy.timeout_seconds)
    return breaker


def test_a_hung_probe_frees_its_slot_after_the_probe_lease() -> None:
    clock = FakeClock()
    breaker = half_open(clock, probe_lease_seconds=4)
    hung = breaker.acquire()
    assert hung is not None
    assert hung.probe
    clock.advance(3.9)
    assert breaker.acquire() is None  # still within its deadline
    clock.advance(0.2)
    probe = breaker.acquire()
    assert probe is not None, "a hung probe kept the half-open slot forever"
    breaker.record(hung, failed=False)  # its late outcome counts for nothing
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.record(probe, failed=False)
    assert breaker.state is CircuitState.CLOSED


def test_a_probe_slower_than_slow_call_seconds_has_failed() -> None:
    clock = FakeClock()
    breaker = half_open(clock, slow_call_seconds=2, probe_lease_seconds=60)
    hung = breaker.acquire()
    assert hung is not None
    clock.advance(2.5)
    assert breaker.acquire() is None
    assert breaker.state is CircuitState.OPEN, "the slow probe's failure reopens the breaker"
    breaker.record(hung, failed=False)
    assert breaker.state is CircuitState.OPEN
