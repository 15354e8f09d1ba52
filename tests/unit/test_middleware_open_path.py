"""The middleware's answer for an open breaker, taken from its open period: the breaker's rules
still hold (rejections counted, the probe exactly at the end, manual modes, shedding,
Retry-After second by second). Raw ASGI calls with an injected clock."""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from gateway_breaker import CircuitBreakerManager, CircuitBreakerMiddleware, CircuitState
from gateway_breaker.breaker import BreakerSnapshot, ManualMode
from tests.helpers import FakeClock
from tests.unit.support import asgi_get, make_config

TIMEOUT = 10.0


class App:
    """The guarded app: counts calls, answers `status`."""

    def __init__(self) -> None:
        self.calls = 0
        self.status = 200

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


class Answer:
    def __init__(self, messages: list[Message]) -> None:
        self.status = int(messages[0]["status"])
        self.headers = dict(messages[0]["headers"])
        self.body = b"".join(m.get("body", b"") for m in messages[1:])

    @property
    def retry_after(self) -> int:
        return int(self.headers[b"retry-after"])

    @property
    def state(self) -> str:
        return str(json.loads(self.body)["state"])


async def call(middleware: CircuitBreakerMiddleware, path: str = "/svc/x") -> Answer:
    return Answer(await asgi_get(middleware, path))


def gateway(clock: FakeClock, **policy: Any) -> tuple[CircuitBreakerMiddleware, App]:
    values: dict[str, Any] = {"failure_threshold": 1, "timeout_seconds": TIMEOUT}
    values.update(policy)
    config = make_config({"svc": values})
    manager = CircuitBreakerManager(config, clock=clock)
    app = App()
    return CircuitBreakerMiddleware(app, config=config, manager=manager), app


async def opened(clock: FakeClock, **policy: Any) -> tuple[CircuitBreakerMiddleware, App]:
    middleware, app = gateway(clock, **policy)
    app.status = 500
    assert (await call(middleware)).status == 500
    app.status = 200
    assert middleware.manager.get("svc").state is CircuitState.OPEN
    return middleware, app


async def test_each_rejection_is_counted_and_the_app_is_not_called(clock: FakeClock) -> None:
    middleware, app = await opened(clock)
    breaker = middleware.manager.get("svc")
    for _ in range(5):
        answer = await call(middleware)
        assert answer.status == 503
        assert answer.headers[b"x-circuit-breaker"] == b"open"
        assert answer.headers[b"cache-control"] == b"no-store"
        assert answer.state == "open"
    assert app.calls == 1
    assert breaker.calls_rejected == 5
    assert middleware.manager.view("svc").calls["rejected"] == 5


async def test_the_probe_goes_through_exactly_when_the_open_period_ends(clock: FakeClock) -> None:
    middleware, app = await opened(clock)
    breaker = middleware.manager.get("svc")
    clock.advance(TIMEOUT - 0.001)
    answer = await call(middleware)
    assert (answer.status, answer.retry_after) == (503, 1)
    assert app.calls == 1
    clock.advance(0.001)  # the open period is over: the next request is the probe
    assert (await call(middleware)).status == 200
    assert app.calls == 2
    assert breaker.state is CircuitState.CLOSED
    assert breaker.calls_rejected == 1


async def test_a_failed_probe_opens_a_new_period_answered_with_its_retry_after(
    clock: FakeClock,
) -> None:
    middleware, app = await opened(clock)
    clock.advance(TIMEOUT)
    app.status = 503
    assert (await call(middleware)).status == 503  # the probe, failing
    assert middleware.manager.get("svc").state is CircuitState.OPEN
    clock.advance(0.5)
    answer = await call(middleware)
    assert (answer.status, answer.retry_after, answer.state) == (503, 10, "open")
    assert app.calls == 2


async def test_retry_after_counts_down_second_by_second(clock: FakeClock) -> None:
    middleware, _ = await opened(clock)
    seen = []
    for _ in range(20):
        answer = await call(middleware)
        seen.append(answer.retry_after)
        assert answer.retry_after == middleware.manager.get("svc").retry_after_header()
        assert json.loads(answer.body)["retry_after"] == answer.retry_after
        clock.advance(0.49)
    assert seen[0] == 10
    assert seen[-1] == 1
    assert seen == sorted(seen, reverse=True)


async def test_a_breaker_the_fleet_opened_is_answered_from_its_period(clock: FakeClock) -> None:
    middleware, app = gateway(clock)
    breaker = middleware.manager.get("svc")
    breaker.restore(BreakerSnapshot(state=CircuitState.OPEN, opened_at=clock() - 4))
    answer = await call(middleware)
    assert (answer.status, answer.retry_after) == (503, 6)
    assert app.calls == 0
    assert breaker.calls_rejected == 1


@pytest.mark.parametrize("open_first", [False, True])
async def test_forced_open_rejects_whatever_the_automatic_state(
    clock: FakeClock, open_first: bool
) -> None:
    middleware, app = await opened(clock) if open_first else gateway(clock)
    breaker = middleware.manager.get("svc")
    calls = app.calls
    breaker.set_manual(ManualMode("forced_open"), "manual")
    clock.advance(TIMEOUT * 2)  # past any automatic open period: still rejected
    answer = await call(middleware)
    assert (answer.status, answer.state) == (503, "forced_open")
    assert answer.headers[b"x-circuit-breaker"] == b"forced_open"
    assert app.calls == calls
    assert breaker.calls_rejected == 1


@pytest.mark.parametrize("mode", ["metrics_only", "disabled"])
async def test_an_open_breaker_under_a_letting_mode_lets_calls_through(
    clock: FakeClock, mode: str
) -> None:
    middleware, app = await opened(clock)
    middleware.manager.get("svc").set_manual(ManualMode(mode), "manual")
    assert (await call(middleware)).status == 200
    assert app.calls == 2


async def test_a_timed_forced_open_ends_and_the_automatic_period_decides_again(
    clock: FakeClock,
) -> None:
    middleware, app = await opened(clock)
    breaker = middleware.manager.get("svc")
    breaker.set_manual(ManualMode("forced_open", until=clock() + 2), "manual")
    assert (await call(middleware)).state == "forced_open"
    clock.advance(3)  # the manual mode has ended; the automatic open period has not
    answer = await call(middleware)
    assert (answer.status, answer.state, answer.retry_after) == (503, "open", 7)
    assert breaker.manual is None
    assert app.calls == 1


async def test_adaptive_shedding_still_sheds_a_closed_breaker(clock: FakeClock) -> None:
    middleware, app = gateway(clock, mode="adaptive", min_calls=10, failure_threshold=1000)
    app.status = 500
    answers = [await call(middleware) for _ in range(40)]
    app.status = 200
    answers += [await call(middleware) for _ in range(40)]
    shed = [a for a in answers if a.headers.get(b"x-circuit-breaker") == b"shedding"]
    assert shed, "nothing was shed"
    assert all(a.state == "shedding" and a.retry_after == 1 for a in shed)
    assert middleware.manager.get("svc").state is CircuitState.CLOSED
    assert middleware.manager.view("svc").calls["shed"] == len(shed)
