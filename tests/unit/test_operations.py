"""The manager's operations surface in memory: counters, views, manual modes, reset, live
policy, transition events, history and listeners. Clock injected; no I/O."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway_breaker import (
    CircuitBreakerManager,
    CircuitOpenError,
    CircuitState,
    PolicyError,
    TransitionEvent,
)
from tests.helpers import FakeClock, wait_until
from tests.unit.support import make_config

SERVICE = "sona"


class Boom(Exception):
    pass


def boom() -> None:
    raise Boom("upstream down")


def ok() -> str:
    return "ok"


@pytest.fixture
def manager(clock: FakeClock) -> CircuitBreakerManager:
    config = make_config(
        {SERVICE: {"failure_threshold": 3, "timeout_seconds": 10, "min_calls": 4}, "auth": {}}
    )
    manager = CircuitBreakerManager(config, clock=clock)
    manager.get(SERVICE)
    manager.get("auth")
    return manager


async def fail(manager: CircuitBreakerManager, n: int, service: str = SERVICE) -> None:
    for _ in range(n):
        with pytest.raises(Boom):
            await manager.call(service, boom)


async def rejected(manager: CircuitBreakerManager, service: str = SERVICE) -> bool:
    try:
        await manager.call(service, ok)
    except CircuitOpenError:
        return True
    return False


async def test_calls_are_counted_by_outcome(manager: CircuitBreakerManager) -> None:
    for _ in range(5):
        await manager.call(SERVICE, ok)
    await fail(manager, 3)
    assert await rejected(manager)
    assert await rejected(manager)
    view = manager.view(SERVICE)
    assert dict(view.calls) == {
        "success": 5,
        "failure": 3,
        "slow": 0,
        "rejected": 2,
        "shed": 0,
        "ignored": 0,
    }
    assert view.state == "open"
    assert view.failure_rate == pytest.approx(3 / 8)
    assert (view.window_calls, view.window_failures) == (8, 3)


async def test_failure_rate_is_none_until_min_calls(manager: CircuitBreakerManager) -> None:
    await manager.call(SERVICE, ok)
    assert manager.view(SERVICE).failure_rate is None


async def test_a_cancelled_call_is_ignored(manager: CircuitBreakerManager) -> None:
    started = asyncio.Event()

    async def hang() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(manager.call(SERVICE, hang))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert manager.view(SERVICE).calls["ignored"] == 1


async def test_slow_calls_count_as_slow_and_open_with_their_cause(clock: FakeClock) -> None:
    config = make_config({SERVICE: {"failure_threshold": 2, "slow_call_seconds": 1}})
    manager = CircuitBreakerManager(config, clock=clock)

    def slow() -> str:
        clock.advance(2)
        return "late"

    for _ in range(2):
        assert await manager.call(SERVICE, slow) == "late"
    view = manager.view(SERVICE)
    assert view.calls["slow"] == 2
    assert view.state == "open"
    (event,) = await manager.history(SERVICE)
    assert (event.from_state, event.to_state, event.cause) == ("closed", "open", "slow_calls")


async def test_history_lists_transitions_newest_first_with_causes(
    manager: CircuitBreakerManager, clock: FakeClock
) -> None:
    await fail(manager, 3)
    clock.advance(10)
    await manager.call(SERVICE, ok)
    history = await manager.history(SERVICE)
    assert [(e.from_state, e.to_state, e.cause) for e in history] == [
        ("half_open", "closed", "probe_succeeded"),
        ("open", "half_open", "timeout_elapsed"),
        ("closed", "open", "failure_threshold"),
    ]
    assert all(e.origin == "local" and e.instance == manager.instance_id for e in history)
    assert history[-1].failure_count == 3
    assert len(await manager.history(SERVICE, limit=1)) == 1
    assert manager.transition_counts[(SERVICE, "closed", "open", "local")] == 1


async def test_the_error_rate_rule_names_its_cause(clock: FakeClock) -> None:
    config = make_config({SERVICE: {"failure_threshold": 100, "min_calls": 4}})
    manager = CircuitBreakerManager(config, clock=clock)
    for _ in range(2):
        await manager.call(SERVICE, ok)
    await fail(manager, 2)
    (event,) = await manager.history(SERVICE)
    assert event.cause == "error_rate"
    assert event.failure_rate == pytest.approx(0.5)


async def test_forced_open_rejects_everything_until_released(
    manager: CircuitBreakerManager,
) -> None:
    view = await manager.set_manual(SERVICE, "forced_open", reason="maintenance")
    assert view.state == "forced_open"
    assert view.automatic_state == "closed"
    assert view.manual is not None
    assert view.manual.reason == "maintenance"
    assert await rejected(manager)
    assert manager.view(SERVICE).calls["rejected"] == 1
    view = await manager.clear_manual(SERVICE)
    assert view.state == "closed"
    assert view.manual is None
    assert not await rejected(manager)
    causes = [e.cause for e in await manager.history(SERVICE)]
    assert causes == ["manual_released", "manual"]
    assert (await manager.history(SERVICE))[1].reason == "maintenance"
    assert manager.transition_counts[(SERVICE, "closed", "forced_open", "manual")] == 1


async def test_a_timed_mode_ends_by_itself(
    manager: CircuitBreakerManager, clock: FakeClock
) -> None:
    await manager.set_manual(SERVICE, "forced_open", seconds=30)
    assert manager.view(SERVICE).retry_after == pytest.approx(30)
    clock.advance(29)
    assert await rejected(manager)
    clock.advance(1)
    assert manager.view(SERVICE).state == "closed"
    assert not await rejected(manager)
    assert (await manager.history(SERVICE))[0].cause == "manual_expired"


async def test_disabled_lets_everything_through_and_counts_nothing(
    manager: CircuitBreakerManager,
) -> None:
    await manager.set_manual(SERVICE, "disabled")
    await fail(manager, 10)
    view = manager.view(SERVICE)
    assert view.state == "disabled"
    assert view.automatic_state == "closed"
    assert view.failure_count == 0
    assert not await rejected(manager)


async def test_metrics_only_runs_the_machine_but_never_rejects(
    manager: CircuitBreakerManager,
) -> None:
    await manager.set_manual(SERVICE, "metrics_only")
    await fail(manager, 3)
    view = manager.view(SERVICE)
    assert view.state == "metrics_only"
    assert view.automatic_state == "open"
    assert not await rejected(manager)
    newest = (await manager.history(SERVICE))[0]
    assert (newest.from_state, newest.to_state, newest.cause) == (
        "closed",
        "open",
        "failure_threshold",
    )


async def test_reset_starts_over(manager: CircuitBreakerManager) -> None:
    await fail(manager, 3)
    await manager.set_manual(SERVICE, "forced_open")
    view = await manager.reset(SERVICE, reason="fixed")
    assert view.state == "closed"
    assert (view.failure_count, view.window_calls, view.manual) == (0, 0, None)
    assert not await rejected(manager)
    newest = (await manager.history(SERVICE))[0]
    assert (newest.to_state, newest.cause, newest.origin, newest.reason) == (
        "closed",
        "reset",
        "manual",
        "fixed",
    )


async def test_unknown_services_and_modes_are_refused(manager: CircuitBreakerManager) -> None:
    with pytest.raises(KeyError):
        await manager.set_manual("nope", "forced_open")
    with pytest.raises(KeyError):
        manager.view("nope")
    with pytest.raises(PolicyError) as info:
        await manager.set_manual(SERVICE, "closed")
    assert info.value.errors[0]["field"] == "mode"
    with pytest.raises(PolicyError):
        await manager.set_manual(SERVICE, "forced_open", seconds=-1)


async def test_a_live_policy_applies_and_can_be_lifted(manager: CircuitBreakerManager) -> None:
    view = await manager.set_policy(SERVICE, {"failure_threshold": 2}, reason="touchy")
    assert view.policy.failure_threshold == 2
    assert view.policy_overridden
    await fail(manager, 2)
    assert manager.view(SERVICE).state == "open"
    view = await manager.clear_policy(SERVICE)
    assert view.policy.failure_threshold == 3
    assert not view.policy_overridden
    assert next(e.cause for e in await manager.history(SERVICE)) == "policy"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"error_rate_threshold": 2}, "error_rate_threshold"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"prefix": "/x"}, "prefix"),
        ({"timeout_seconds": 10, "max_timeout_seconds": 5}, "policy"),
    ],
)
async def test_an_invalid_policy_names_the_field(
    manager: CircuitBreakerManager, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(PolicyError) as info:
        await manager.set_policy(SERVICE, fields)
    assert info.value.errors[0]["field"] == field
    assert manager.view(SERVICE).policy.failure_threshold == 3  # nothing changed


async def test_a_new_window_length_restarts_the_window(manager: CircuitBreakerManager) -> None:
    await fail(manager, 2)
    view = await manager.set_policy(SERVICE, {"window_seconds": 30})
    assert view.window_calls == 0
    assert view.failure_count == 2  # consecutive failures still count


async def test_listeners_and_event_streams_see_every_transition(
    manager: CircuitBreakerManager,
) -> None:
    seen: list[TransitionEvent] = []
    unsubscribe = manager.on_transition(seen.append)
    stream = manager.events()
    first = asyncio.ensure_future(anext(stream))
    await wait_until(lambda: bool(manager._subscribers), message="the subscriber")
    await fail(manager, 3)
    event = await asyncio.wait_for(first, 5)
    assert (event.service, event.to_state) == (SERVICE, "open")
    await wait_until(lambda: len(seen) == 1, message="the listener")
    unsubscribe()
    await manager.reset(SERVICE)
    # Replays: everything after the first event.
    replay = manager.events(after=event.id)
    again = await asyncio.wait_for(anext(replay), 5)
    assert again.cause == "reset"
    assert len(seen) == 1
    await stream.aclose()
    await replay.aclose()


async def test_a_failing_listener_does_not_hurt_the_request(
    manager: CircuitBreakerManager, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: TransitionEvent) -> None:
        raise RuntimeError("listener bug")

    manager.on_transition(broken)
    await fail(manager, 3)
    assert await rejected(manager)
    await wait_until(lambda: "listener failed" in caplog.text, message="the log line")


async def test_fleet_view_in_memory_is_this_instance(manager: CircuitBreakerManager) -> None:
    await fail(manager, 3)
    fleet = await manager.fleet()
    (instance,) = fleet.instances
    assert instance.id == manager.instance_id
    assert instance.breakers[SERVICE] == ("open", 0)
    assert fleet.to_dict()["store"] == {}
    assert manager.store_kind == "memory"
    assert manager.store_up is None


def test_views_serialise_to_the_admin_contract(manager: CircuitBreakerManager) -> None:
    from gateway_breaker.admin.openapi import openapi_document

    doc = manager.view(SERVICE).to_dict()
    schema = openapi_document("/_breakers")["components"]["schemas"]["BreakerView"]
    assert set(doc) == set(schema["required"])  # the view is what the admin API documents
    assert doc["policy"]["failure_status_codes"] == "500-599"
    assert manager.get(SERVICE).state is CircuitState.CLOSED
