"""The adaptive mode in the breaker, the manager and the middleware: injected clock and random."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from gateway_breaker import CircuitBreaker, CircuitBreakerManager, CircuitBreakerMiddleware
from gateway_breaker.breaker import ManualMode
from tests.helpers import FakeClock
from tests.unit.support import make_config, make_policy


class Draws:
    """A random source that cycles through 0.00, 0.01, ..., 0.99: shares come out exact."""

    def __init__(self) -> None:
        self._next = itertools.cycle(i / 100 for i in range(100))

    def __call__(self) -> float:
        return next(self._next)


def adaptive(clock: FakeClock, **policy: Any) -> CircuitBreaker:
    values: dict[str, Any] = {"mode": "adaptive", "min_calls": 20, "failure_threshold": 50}
    values.update(policy)
    return CircuitBreaker("svc", make_policy(**values), clock=clock, rng=Draws())


def run(breaker: CircuitBreaker, calls: int, fail_every: int | None = None) -> int:
    """Make `calls` calls, failing every `fail_every`-th admitted one; returns the shed count."""
    shed = admitted = 0
    for _ in range(calls):
        permit = breaker.acquire()
        if permit is None:
            shed += 1
            continue
        admitted += 1
        breaker.record(permit, failed=fail_every is not None and admitted % fail_every == 0)
    return shed


def test_sheds_the_share_the_formula_gives_and_never_opens_on_the_error_rate(
    clock: FakeClock,
) -> None:
    breaker = adaptive(clock, error_rate_threshold=0.3)
    # Fail 2 in 5 (40%): 20 calls fill min_calls, then the probability takes over.
    run(breaker, 20, fail_every=None)
    for _ in range(8):
        breaker.record(breaker.acquire() or pytest.fail("shed too early"), failed=False)
    shed = run(breaker, 1000, fail_every=2)  # 50% of admitted calls fail
    assert breaker.state.value == "closed"  # 50% > error_rate_threshold, and yet closed
    calls, failures = breaker.window_counts()
    p = breaker.rejection_probability()
    assert p == pytest.approx((calls - (calls - failures) / 0.95) / (calls + 1), abs=1e-9)
    assert 0.3 < shed / 1000 < 0.6
    assert breaker.calls_shed == shed
    assert calls + shed == 1028  # shed calls are not in the window
    assert breaker.health() == pytest.approx((calls - failures) / calls / 0.95)


def test_classic_mode_never_sheds(clock: FakeClock) -> None:
    breaker = adaptive(clock, mode="classic", error_rate_threshold=1.0)
    assert run(breaker, 200, fail_every=3) == 0
    assert breaker.rejection_probability() == 0.0
    assert breaker.health() < 1.0  # health is reported in every mode


def test_below_min_calls_nothing_is_shed(clock: FakeClock) -> None:
    breaker = adaptive(clock, min_calls=100)
    assert run(breaker, 99, fail_every=2) == 0


def test_consecutive_failures_still_open_it(clock: FakeClock) -> None:
    breaker = adaptive(clock, failure_threshold=5)
    run(breaker, 30)
    run(breaker, 20, fail_every=1)  # some are shed: the run of failures goes on regardless
    assert breaker.state.value == "open"
    assert breaker.rejection_probability() == 0.0


def test_shedding_ends_when_the_failures_slide_out_of_the_window(clock: FakeClock) -> None:
    breaker = adaptive(clock, window_seconds=10.0)
    run(breaker, 200, fail_every=2)
    assert breaker.rejection_probability() > 0.3
    clock.advance(11.0)
    assert run(breaker, 50) == 0
    assert breaker.rejection_probability() == 0.0
    assert breaker.health() == 1.0


def test_metrics_only_computes_the_probability_and_never_sheds(clock: FakeClock) -> None:
    breaker = adaptive(clock)
    breaker.set_manual(ManualMode("metrics_only"), "manual")
    assert run(breaker, 300, fail_every=2) == 0
    assert breaker.rejection_probability() > 0.3
    assert breaker.calls_shed == 0


def test_a_policy_change_switches_modes(clock: FakeClock) -> None:
    breaker = adaptive(clock, mode="classic", error_rate_threshold=1.0)
    run(breaker, 100, fail_every=2)
    breaker.set_policy(make_policy(mode="adaptive", min_calls=20, failure_threshold=50))
    assert run(breaker, 100, fail_every=2) > 20
    breaker.set_policy(make_policy(mode="classic", min_calls=20, failure_threshold=50))
    assert run(breaker, 100) == 0


def test_fleet_counts_decide_while_fresh(clock: FakeClock) -> None:
    breaker = adaptive(clock, window_seconds=10.0)
    breaker.set_fleet(True)
    run(breaker, 100)  # all ours succeed ...
    breaker.observe_fleet(1000, 400)  # ... the fleet's fail 40%
    assert breaker.rejection_probability() == pytest.approx(0.368, abs=0.001)
    assert 30 <= run(breaker, 100) <= 45
    clock.advance(10.5)  # no fresh fleet counts: ours again (nothing failed)
    assert breaker.rejection_probability() == 0.0


def test_the_shed_answer(clock: FakeClock) -> None:
    async def endpoint(request: Request) -> Response:
        status = 500 if request.query_params.get("fail") else 200
        return PlainTextResponse("x", status_code=status)

    config = make_config({"svc": {"mode": "adaptive", "min_calls": 10, "failure_threshold": 1000}})
    manager = CircuitBreakerManager(config, clock=clock)
    app = CircuitBreakerMiddleware(
        Starlette(routes=[Route("/svc", endpoint)]), config=config, manager=manager
    )

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            failing = [await client.get("/svc", params={"fail": "1"}) for _ in range(40)]
            return failing + [await client.get("/svc") for _ in range(40)]

    responses = asyncio.run(scenario())
    shed = [r for r in responses if r.headers.get("x-circuit-breaker") == "shedding"]
    assert shed, "nothing was shed"
    first = shed[0]
    assert first.status_code == 503
    assert first.headers["retry-after"] == "1"
    assert first.headers["cache-control"] == "no-store"
    assert first.headers["content-type"] == "application/problem+json"
    assert json.loads(first.content)["state"] == "shedding"
    assert manager.view("svc").calls["shed"] == len(shed)
