"""Rejections: the kept 503s say exactly what the breaker says, second by second."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from gateway_breaker import CircuitBreaker, CircuitState
from gateway_breaker.rejection import Rejections, build
from tests.helpers import FakeClock
from tests.unit.support import make_policy


def opened(clock: FakeClock, timeout_seconds: float) -> CircuitBreaker:
    breaker = CircuitBreaker(
        "svc", make_policy(failure_threshold=1, timeout_seconds=timeout_seconds), clock=clock
    )
    permit = breaker.acquire()
    assert permit is not None
    breaker.record(permit, failed=True)
    assert breaker.state is CircuitState.OPEN
    return breaker


def retry_after_of(headers: list[tuple[bytes, bytes]]) -> int:
    return int(dict(headers)[b"retry-after"])


@given(
    timeout=st.floats(min_value=1, max_value=120),
    steps=st.lists(st.floats(min_value=0, max_value=3), max_size=40),
)
def test_open_answer_follows_the_breakers_retry_after(timeout: float, steps: list[float]) -> None:
    clock = FakeClock()
    breaker = opened(clock, timeout)
    rejections = Rejections()
    for step in steps:
        clock.advance(step)
        if breaker.acquire() is not None:
            break  # the open period is over: the breaker probes instead of rejecting
        headers, body = rejections.of(breaker)
        assert retry_after_of(headers) == breaker.retry_after_header() >= 1
        doc = json.loads(body)
        assert doc["retry_after"] == breaker.retry_after_header()
        assert (doc["service"], doc["state"], doc["status"]) == ("svc", "open", 503)


def test_answer_is_the_contract() -> None:
    headers, body = build("svc", "open", 7)
    assert dict(headers) == {
        b"content-type": b"application/problem+json",
        b"content-length": str(len(body)).encode(),
        b"retry-after": b"7",
        b"cache-control": b"no-store",
        b"x-circuit-breaker": b"open",
    }
    assert json.loads(body)["detail"] == "Circuit breaker for service 'svc' is open"


def test_a_new_open_period_gets_a_new_answer(clock: FakeClock) -> None:
    breaker = opened(clock, 30)
    rejections = Rejections()
    assert retry_after_of(rejections.of(breaker)[0]) == 30
    clock.advance(31)
    permit = breaker.acquire()  # the probe, failing: open again for another 30 s
    assert permit is not None
    assert permit.probe
    breaker.record(permit, failed=True)
    clock.advance(0.5)
    assert retry_after_of(rejections.of(breaker)[0]) == breaker.retry_after_header() == 30
