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
