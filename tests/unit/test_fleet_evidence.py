"""Fleet evidence in the pure state machine: counting for the fleet, local opens, the ramp."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway_breaker import BreakerSnapshot, CircuitBreaker, CircuitState, Policy
from gateway_breaker.store.codec import decode_state, encode_state
from tests.helpers import FakeClock
from tests.unit.support import make_policy

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


class Evidence:
    """Counts the breaker's `on_evidence` calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, breaker: CircuitBreaker) -> None:
        self.calls += 1


def make(
    clock: FakeClock, evidence: Evidence | None = None, rng: Any = None, **policy: Any
) -> CircuitBreaker:
    kwargs: dict[str, Any] = {"clock": clock, "on_evidence": evidence}
    if rng is not None:
        kwargs["rng"] = rng
    return CircuitBreaker("svc", make_policy(**policy), **kwargs)


def call(breaker: CircuitBreaker, failed: bool) -> bool:
    """One call; False when it was rejected."""
    permit = breaker.acquire()
    if permit is None:
        return False
    breaker.record(permit, failed)
    return True


def close_by_probe(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """Open the breaker on its own counts, wait out the timeout, and close it with a probe."""
    for _ in range(breaker.policy.failure_threshold):
        call(breaker, True)
    assert breaker.state is OPEN
    clock.advance(breaker.policy.timeout_seconds)
    assert call(breaker, False)
    assert breaker.state is CLOSED


# -- policy fields ------------------------------------------------------------------------


def test_policy_defaults_count_for_the_fleet_with_quorum_one_and_no_ramp() -> None:
    policy = Policy()
    assert (policy.counting, policy.quorum, policy.recovery_seconds) == ("fleet", 1, None)


@pytest.mark.parametrize(
    ("field", "value"),
    [("quorum", 0), ("counting", "everyone"), ("recovery_seconds", 0), ("recovery_seconds", -1)],
)
def test_bad_fleet_fields_are_errors_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        Policy.model_validate({field: value})
    assert field in str(caught.value)


# -- counting for the fleet ---------------------------------------------------------------


def test_without_a_fleet_the_breaker_counts_alone_as_before(clock: FakeClock) -> None:
    evidence = Evidence()
    breaker = make(clock, evidence)
    for _ in range(3):
        call(breaker, True)
    assert breaker.state is OPEN
    assert evidence.calls == 0


def test_fleet_counting_failures_are_evidence_for_the_fleet(clock: FakeClock) -> None:
    evidence = Evidence()
    breaker = make(clock, evidence, failure_threshold=12)
    breaker.set_fleet(True)
    assert breaker.fleet_counting
    for _ in range(11):
        assert call(breaker, True)
    assert breaker.state is CLOSED  # the fleet decides on everyone's counts
    assert breaker.failure_count == 11
    assert breaker.window_counts() == (11, 11)
    assert evidence.calls == 11
    assert breaker.own_rule() is None


def test_own_counts_alone_open_for_the_fleet_at_quorum_one(clock: FakeClock) -> None:
    transitions: list[tuple[str, str, bool]] = []
    breaker = make(clock, Evidence())
    breaker.on_transition = lambda b, _: transitions.append((b.last_from, b.last_to, b.local))
    breaker.set_fleet(True)
    for _ in range(3):
        call(breaker, True)
    assert breaker.state is OPEN
    assert transitions == [("closed", "open", False)]  # a transition for the fleet, no wait


def test_own_counts_alone_open_for_this_instance_only_above_quorum_one(
    clock: FakeClock,
) -> None:
    evidence = Evidence()
    breaker = make(clock, evidence, quorum=2)
    breaker.set_fleet(True)
    for _ in range(3):
        call(breaker, True)
    assert (breaker.state, breaker.local, breaker.reported) == (OPEN, True, True)
    assert evidence.calls == 3  # the fleet still gets our counts: with others', it may open


def test_counting_instance_keeps_per_instance_counting_with_a_fleet(clock: FakeClock) -> None:
    breaker = make(clock, Evidence(), counting="instance")
    breaker.set_fleet(True)
    assert not breaker.fleet_counting
    for _ in range(3):
        call(breaker, True)
    assert breaker.state is OPEN


def test_a_live_policy_change_turns_fleet_counting_on_and_off(clock: FakeClock) -> None:
    breaker = make(clock, Evidence())
    breaker.set_fleet(True)
    breaker.set_policy(make_policy(counting="instance"))
    assert not breaker.fleet_counting
    breaker.set_policy(make_policy(counting="fleet"))
    assert breaker.fleet_counting


def test_success_after_a_reported_run_is_new_evidence_only_then(clock: FakeClock) -> None:
    evidence = Evidence()
    breaker = make(clock, evidence)
    breaker.set_fleet(True)
    call(breaker, False)
    assert evidence.calls == 0  # steady: nothing for the fleet
    call(breaker, True)
    assert evidence.calls == 1
    breaker.reported = True  # the sync sent the run of 1
    call(breaker, False)
    assert evidence.calls == 2  # the run the fleet holds is over
    assert breaker.failure_count == 0


def test_error_rate_rule_on_own_counts(clock: FakeClock) -> None:
    breaker = make(clock, Evidence(), min_calls=4, failure_threshold=100, quorum=2)
    breaker.set_fleet(True)
    for failed in (False, True, False):
        call(breaker, failed)
    assert breaker.own_rule() is None
    call(breaker, True)
    assert (breaker.state, breaker.local, breaker.last_cause) == (OPEN, True, "error_rate")


# -- opening for this instance only -------------------------------------------------------


def test_open_locally_rejects_here_probes_alone_and_closes_back(clock: FakeClock) -> None:
    evidence = Evidence()
    breaker = make(clock, evidence, timeout_seconds=5, quorum=3)
    breaker.set_fleet(True)
    for _ in range(3):
        call(breaker, True)
    assert (breaker.state, breaker.local) == (OPEN, True)
    assert not call(breaker, False)
    clock.advance(5)
    permit = breaker.acquire()
    assert permit is not None
    assert permit.probe
    assert breaker.local  # still this instance's own period
    seen = evidence.calls
    breaker.record(permit, False)
    assert (breaker.state, breaker.local) == (CLOSED, False)
    assert evidence.calls == seen + 1  # the fleet learns our run is over


def test_open_locally_only_from_closed(clock: FakeClock) -> None:
    breaker = make(clock)
    for _ in range(3):
        call(breaker, True)
    assert breaker.state is OPEN
    assert not breaker.open_locally("failure_threshold")
    assert not breaker.local


def test_fleet_state_replaces_a_local_open(clock: FakeClock) -> None:
    breaker = make(clock, Evidence())
    breaker.set_fleet(True)
    breaker.open_locally("failure_threshold")
    fleet = BreakerSnapshot(state=OPEN, failure_count=12, opened_at=clock(), version=3)
    assert breaker.restore(fleet)
    assert not breaker.local
    assert not breaker.reported


# -- the recovery ramp --------------------------------------------------------------------


def test_ramp_admits_a_share_rising_linearly_then_everything(clock: FakeClock) -> None:
    draws = itertools.cycle([i / 10 for i in range(10)])  # 0.0 .. 0.9, evenly
    breaker = make(clock, rng=lambda: next(draws), recovery_seconds=4)
    close_by_probe(breaker, clock)
    assert breaker.ramping
    admitted = [sum(call(breaker, False) for _ in range(10))]
    for _ in range(4):
        clock.advance(1)
        admitted.append(sum(call(breaker, False) for _ in range(10)))
    # Share 0 at the close, 25% after 1 s, 50% after 2 s, 75% after 3 s, all after 4 s.
    assert admitted == [0, 3, 5, 8, 10]
    assert not breaker.ramping
    assert breaker.calls_rejected == 50 - sum(admitted)
    assert breaker.retry_after_header() == 1


def test_ramp_rejection_answers_retry_after_one(clock: FakeClock) -> None:
    breaker = make(clock, rng=lambda: 0.99, recovery_seconds=10)
    close_by_probe(breaker, clock)
    assert breaker.acquire() is None
    assert breaker.retry_after_header() == 1


def test_without_recovery_seconds_a_close_lets_everything_through(clock: FakeClock) -> None:
    breaker = make(clock, rng=lambda: 0.99)
    close_by_probe(breaker, clock)
    assert not breaker.ramping
    assert all(call(breaker, False) for _ in range(20))


def test_a_failure_during_the_ramp_counts_and_may_reopen(clock: FakeClock) -> None:
    breaker = make(clock, rng=lambda: 0.0, recovery_seconds=4)
    close_by_probe(breaker, clock)
    clock.advance(0.1)
    for _ in range(3):
        assert call(breaker, True)
    assert breaker.state is OPEN
    assert not breaker.ramping


def test_fleet_close_ramps_from_the_stored_close_time(clock: FakeClock) -> None:
    breaker = make(clock, rng=lambda: 0.5, recovery_seconds=4)
    opened = BreakerSnapshot(state=OPEN, failure_count=3, opened_at=clock() - 20, version=1)
    breaker.restore(opened)
    closed = BreakerSnapshot(state=CLOSED, version=3, closed_at=clock() - 1)
    assert breaker.restore(closed)
    assert breaker.ramp_share() == pytest.approx(0.25)
    assert breaker.acquire() is None  # 0.5 of the span is more than the 0.25 elapsed
    clock.advance(2)
    assert breaker.acquire() is not None
    # An old close (the ramp is over) ramps nothing.
    later = make(clock, rng=lambda: 0.99, recovery_seconds=4)
    later.restore(opened)
    later.restore(BreakerSnapshot(state=CLOSED, version=3, closed_at=clock() - 10))
    assert not later.ramping


def test_reset_and_manual_modes_skip_and_override_the_ramp(clock: FakeClock) -> None:
    breaker = make(clock, rng=lambda: 0.99, recovery_seconds=4)
    close_by_probe(breaker, clock)
    from gateway_breaker.breaker import ManualMode

    breaker.set_manual(ManualMode("disabled"), "manual")
    assert breaker.acquire() is not None  # disabled lets everything through
    breaker.set_manual(None, "manual_released")
    assert breaker.acquire() is None  # the ramp goes on
    breaker.reset()
    assert not breaker.ramping
    assert breaker.acquire() is not None


def test_closed_at_travels_in_the_stored_json(clock: FakeClock) -> None:
    snapshot = BreakerSnapshot(state=CLOSED, version=2, closed_at=1_700_000_123.456)
    decoded = decode_state(encode_state(snapshot).replace("}", ',"version":2}'))
    assert decoded.closed_at == pytest.approx(1_700_000_123.456)
    opened = BreakerSnapshot(state=OPEN, opened_at=1.0e9, version=2, closed_at=5.0e8)
    assert decode_state(encode_state(opened)).closed_at is None


@settings(max_examples=200, deadline=None)
@given(
    recovery=st.floats(0.5, 60),
    steps=st.lists(st.floats(0, 5), min_size=1, max_size=30),
    draw=st.floats(0, 0.999),
)
def test_ramp_share_never_falls_and_ends_at_everything(
    recovery: float, steps: list[float], draw: float
) -> None:
    clock = FakeClock()
    breaker = make(clock, rng=lambda: draw, recovery_seconds=recovery)
    close_by_probe(breaker, clock)
    last, admitted_before = 0.0, False
    for step in steps:
        clock.advance(step)
        share = breaker.ramp_share()
        assert share >= last
        last = share
        admitted = breaker.acquire() is not None
        # Once a fixed draw is admitted, a later (larger) share admits it too.
        assert admitted or not admitted_before
        admitted_before = admitted
    clock.advance(recovery)
    assert breaker.acquire() is not None
    assert not breaker.ramping
