"""CircuitBreaker: the pure state machine, driven by a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from gateway_breaker import BreakerSnapshot, CircuitBreaker, CircuitState, Permit
from tests.helpers import FakeClock
from tests.unit.support import make_policy

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


class Transitions:
    """Records (previous, new) for every on_transition call."""

    def __init__(self) -> None:
        self.seen: list[tuple[CircuitState, CircuitState]] = []

    def __call__(self, breaker: CircuitBreaker, previous: CircuitState) -> None:
        self.seen.append((previous, breaker.state))


def make_breaker(
    clock: FakeClock, transitions: Transitions | None = None, **policy: Any
) -> CircuitBreaker:
    return CircuitBreaker("svc", make_policy(**policy), clock=clock, on_transition=transitions)


def permit(breaker: CircuitBreaker) -> Permit:
    p = breaker.acquire()
    assert p is not None, f"{breaker!r} rejected a call it should have let through"
    return p


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.record(permit(breaker), failed=True)


def succeed(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.record(permit(breaker), failed=False)


def open_breaker(breaker: CircuitBreaker) -> None:
    fail(breaker, breaker.policy.failure_threshold)
    assert breaker.state is OPEN


def half_open(breaker: CircuitBreaker, clock: FakeClock) -> Permit:
    """Open the breaker, wait out the timeout, and return the first probe's permit."""
    open_breaker(breaker)
    clock.advance(breaker.policy.timeout_seconds)
    probe = permit(breaker)
    assert breaker.state is HALF_OPEN
    return probe


# -- closed -> open ------------------------------------------------------------------------


def test_starts_closed_and_lets_calls_through(clock: FakeClock) -> None:
    breaker = make_breaker(clock)
    assert breaker.state is CLOSED
    permits = [breaker.acquire() for _ in range(50)]
    assert all(p is not None for p in permits)


def test_consecutive_failures_open_the_breaker(clock: FakeClock) -> None:
    breaker = make_breaker(clock, failure_threshold=3)
    fail(breaker, 2)
    assert breaker.state is CLOSED
    fail(breaker)
    assert breaker.state is OPEN
    assert breaker.acquire() is None


def test_a_success_resets_the_consecutive_failure_count(clock: FakeClock) -> None:
    breaker = make_breaker(clock, failure_threshold=3)
    fail(breaker, 2)
    succeed(breaker)
    fail(breaker, 2)
    assert breaker.state is CLOSED
    fail(breaker)
    assert breaker.state is OPEN


def test_error_rate_opens_once_min_calls_are_in_the_window(clock: FakeClock) -> None:
    breaker = make_breaker(
        clock, failure_threshold=1_000, min_calls=10, error_rate_threshold=0.5, window_seconds=10
    )
    # 9 calls, all failures: a 100% error rate, but fewer than min_calls in the window.
    fail(breaker, 9)
    assert breaker.state is CLOSED
    fail(breaker)  # the 10th call
    assert breaker.state is OPEN


def test_error_rate_counts_failures_that_are_not_consecutive(clock: FakeClock) -> None:
    breaker = make_breaker(
        clock, failure_threshold=3, min_calls=10, error_rate_threshold=0.6, window_seconds=10
    )
    # S F F S F F S F F S: never three failures in a row.
    for failed in [False, True, True, False, True, True, False, True, True]:
        breaker.record(permit(breaker), failed=failed)
        assert breaker.state is CLOSED
    succeed(breaker)  # 10 calls, 6 failures (60%), but a success never opens it
    assert breaker.state is CLOSED
    fail(breaker)  # 11 calls, 7 failures (64%)
    assert breaker.state is OPEN


def test_error_rate_below_threshold_keeps_it_closed(clock: FakeClock) -> None:
    breaker = make_breaker(
        clock, failure_threshold=1_000, min_calls=10, error_rate_threshold=0.5, window_seconds=10
    )
    for i in range(100):  # 40% failures
        breaker.record(permit(breaker), failed=i % 5 in (0, 2))
        assert breaker.state is CLOSED


def test_error_rate_forgets_calls_that_slid_out_of_the_window(clock: FakeClock) -> None:
    breaker = make_breaker(
        clock, failure_threshold=1_000, min_calls=10, error_rate_threshold=0.5, window_seconds=10
    )
    fail(breaker, 9)
    clock.advance(30)
    fail(breaker)  # only one call in the window now
    assert breaker.state is CLOSED
    fail(breaker, 8)
    assert breaker.state is CLOSED
    fail(breaker)
    assert breaker.state is OPEN


# -- open -> half_open -> closed / open ----------------------------------------------------


def test_open_rejects_until_the_timeout_then_lets_a_probe_through(clock: FakeClock) -> None:
    breaker = make_breaker(clock, timeout_seconds=10)
    open_breaker(breaker)
    clock.advance(9.9)
    assert breaker.acquire() is None
    assert breaker.state is OPEN
    clock.advance(0.1)
    probe = breaker.acquire()
    assert probe is not None
    assert breaker.state is HALF_OPEN


def test_half_open_closes_after_success_threshold_successes(clock: FakeClock) -> None:
    breaker = make_breaker(clock, success_threshold=3)
    probe = half_open(breaker, clock)
    breaker.record(probe, failed=False)
    assert breaker.state is HALF_OPEN
    succeed(breaker)
    assert breaker.state is HALF_OPEN
    succeed(breaker)
    assert breaker.state is CLOSED
    assert all(breaker.acquire() is not None for _ in range(10))


def test_half_open_reopens_on_a_failed_probe(clock: FakeClock) -> None:
    breaker = make_breaker(clock, success_threshold=2, timeout_seconds=10)
    probe = half_open(breaker, clock)
    breaker.record(probe, failed=False)
    reopened_at = clock.now + 1
    clock.advance(1)
    fail(breaker)
    assert breaker.state is OPEN
    assert breaker.opened_at == reopened_at
    assert breaker.acquire() is None
    clock.advance(9.9)
    assert breaker.acquire() is None  # a full new timeout from the failed probe
    clock.advance(0.1)
    assert breaker.acquire() is not None
    assert breaker.state is HALF_OPEN


def test_half_open_max_calls_limits_probes_at_once(clock: FakeClock) -> None:
    breaker = make_breaker(clock, half_open_max_calls=2, success_threshold=3)
    first = half_open(breaker, clock)
    second = permit(breaker)
    assert breaker.acquire() is None
    assert breaker.acquire() is None
    breaker.record(first, failed=False)  # a slot frees, the breaker stays half-open
    assert breaker.state is HALF_OPEN
    third = permit(breaker)
    assert breaker.acquire() is None
    breaker.record(second, failed=False)
    breaker.record(third, failed=False)
    assert breaker.state is CLOSED


def test_single_probe_by_default(clock: FakeClock) -> None:
    breaker = CircuitBreaker("svc", make_policy(half_open_max_calls=1), clock=clock)
    half_open(breaker, clock)
    assert breaker.acquire() is None


# -- generations ---------------------------------------------------------------------------


def test_outcomes_of_permits_from_before_opening_change_nothing(clock: FakeClock) -> None:
    breaker = make_breaker(clock, failure_threshold=2)
    early = [permit(breaker) for _ in range(3)]
    fail(breaker, 2)
    assert breaker.state is OPEN
    generation = breaker.generation
    before = breaker.snapshot()
    clock.advance(1)
    breaker.record(early[0], failed=True)
    breaker.record(early[1], failed=False)
    breaker.release(early[2])
    assert breaker.snapshot() == before
    assert breaker.generation == generation
    assert breaker.state is OPEN


def test_stale_closed_success_does_not_close_a_half_open_breaker(clock: FakeClock) -> None:
    breaker = make_breaker(clock, half_open_max_calls=1)
    early = permit(breaker)
    probe = half_open(breaker, clock)
    breaker.record(early, failed=False)
    assert breaker.state is HALF_OPEN
    assert breaker.acquire() is None  # the stale success freed no probe slot
    breaker.record(probe, failed=False)
    assert breaker.state is CLOSED


def test_stale_probe_outcome_after_reopening_changes_nothing(clock: FakeClock) -> None:
    breaker = make_breaker(clock, half_open_max_calls=2, success_threshold=1)
    first = half_open(breaker, clock)
    second = permit(breaker)
    breaker.record(first, failed=True)
    assert breaker.state is OPEN
    breaker.record(second, failed=False)  # started before the breaker reopened
    assert breaker.state is OPEN
    assert breaker.acquire() is None


def test_stale_probe_release_does_not_free_a_new_generations_slot(clock: FakeClock) -> None:
    breaker = make_breaker(clock, half_open_max_calls=2)
    first = half_open(breaker, clock)
    second = permit(breaker)
    breaker.record(first, failed=True)
    clock.advance(breaker.policy.timeout_seconds)
    permit(breaker)
    permit(breaker)
    assert breaker.acquire() is None
    breaker.release(second)  # from the previous half-open period
    assert breaker.acquire() is None


def test_every_transition_bumps_the_generation(clock: FakeClock) -> None:
    breaker = make_breaker(clock)
    generations = [breaker.generation]
    open_breaker(breaker)
    generations.append(breaker.generation)
    clock.advance(breaker.policy.timeout_seconds)
    probe = permit(breaker)
    generations.append(breaker.generation)
    breaker.record(probe, failed=False)
    assert breaker.state is CLOSED
    generations.append(breaker.generation)
    assert generations == sorted(set(generations))
    succeed(breaker, 3)  # no transition, no new generation
    assert breaker.generation == generations[-1]


# -- release / record ------------------------------------------------------------------------


def test_release_of_an_unused_probe_frees_its_slot(clock: FakeClock) -> None:
    breaker = make_breaker(clock, half_open_max_calls=1)
    probe = half_open(breaker, clock)
    assert breaker.acquire() is None
    breaker.release(probe)
    assert breaker.state is HALF_OPEN
    assert breaker.failure_count == breaker.policy.failure_threshold  # nothing was counted
    assert breaker.success_count == 0
    assert breaker.acquire() is not None


def test_release_in_closed_counts_nothing(clock: FakeClock) -> None:
    breaker = make_breaker(clock, failure_threshold=2)
    fail(breaker)
    for _ in range(5):
        breaker.release(permit(breaker))
    assert breaker.failure_count == 1
    assert breaker.success_count == 0
    assert breaker.state is CLOSED


def test_record_is_idempotent(clock: FakeClock) -> None:
    breaker = make_breaker(clock, failure_threshold=2)
    p = permit(breaker)
    for _ in range(5):
        breaker.record(p, failed=True)
    assert breaker.failure_count == 1
    assert breaker.state is CLOSED


def test_release_is_idempotent(clock: FakeClock) -> None:
    breaker = make_breaker(clock, half_open_max_calls=2)
    first = half_open(breaker, clock)
    permit(breaker)
    breaker.release(first)
    breaker.release(first)  # must not free the other probe's slot too
    permit(breaker)
    assert breaker.acquire() is None


def test_release_after_record_and_record_after_release_are_no_ops(clock: FakeClock) -> None:
    breaker = make_breaker(clock, half_open_max_calls=2, success_threshold=5)
    first = half_open(breaker, clock)
    second = permit(breaker)
    breaker.record(first, failed=False)
    breaker.release(first)  # already recorded: frees nothing more
    third = permit(breaker)
    assert breaker.acquire() is None
    breaker.release(second)
    breaker.record(second, failed=True)  # already released: no failure, no reopening
    assert breaker.state is HALF_OPEN
    assert breaker.success_count == 1
    breaker.record(third, failed=False)
    assert breaker.success_count == 2


# -- slow calls ----------------------------------------------------------------------------


def test_slow_success_counts_as_a_failure(clock: FakeClock) -> None:
    breaker = make_breaker(clock, failure_threshold=2, slow_call_seconds=2)
    for _ in range(2):
        p = permit(breaker)
        clock.advance(2.5)
        breaker.record(p, failed=False)
    assert breaker.state is OPEN
    assert breaker.last_failure_time == clock.now


def test_fast_success_is_a_success_with_slow_call_rule(clock: FakeClock) -> None:
    breaker = make_breaker(clock, failure_threshold=1, slow_call_seconds=2)
    p = permit(breaker)
    clock.advance(1.5)
    breaker.record(p, failed=False)
    assert breaker.state is CLOSED
    assert breaker.success_count == 1
    assert breaker.failure_count == 0


def test_without_slow_call_rule_slow_success_is_a_success(clock: FakeClock) -> None:
    breaker = make_breaker(clock, failure_threshold=1)
    p = permit(breaker)
    clock.advance(3_600)
    breaker.record(p, failed=False)
    assert breaker.state is CLOSED


def test_slow_probe_reopens_the_breaker(clock: FakeClock) -> None:
    breaker = make_breaker(clock, slow_call_seconds=1)
    probe = half_open(breaker, clock)
    clock.advance(5)
    breaker.record(probe, failed=False)
    assert breaker.state is OPEN


# -- seed fields ---------------------------------------------------------------------------


def test_seed_fields_follow_the_outcomes(clock: FakeClock) -> None:
    breaker = make_breaker(clock, failure_threshold=3, timeout_seconds=10)
    assert (breaker.failure_count, breaker.success_count) == (0, 0)
    assert breaker.last_failure_time is None
    assert breaker.opened_at is None

    succeed(breaker, 2)
    assert (breaker.failure_count, breaker.success_count) == (0, 2)

    clock.advance(1)
    fail(breaker)
    first_failure = clock.now
    assert (breaker.failure_count, breaker.success_count) == (1, 0)
    assert breaker.last_failure_time == first_failure

    clock.advance(1)
    succeed(breaker)
    assert (breaker.failure_count, breaker.success_count) == (0, 1)
    assert breaker.last_failure_time == first_failure  # a success does not erase it

    clock.advance(1)
    fail(breaker, 3)
    assert breaker.state is OPEN
    assert breaker.failure_count == 3
    assert breaker.success_count == 0
    assert breaker.last_failure_time == clock.now
    assert breaker.opened_at == clock.now
    opened_at = clock.now

    clock.advance(10)
    probe = permit(breaker)
    assert breaker.state is HALF_OPEN
    assert breaker.opened_at == opened_at
    breaker.record(probe, failed=False)
    assert breaker.state is CLOSED
    assert (breaker.failure_count, breaker.success_count) == (0, 0)


def test_snapshot_carries_the_seed_fields(clock: FakeClock) -> None:
    breaker = make_breaker(clock, failure_threshold=2)
    fail(breaker, 2)
    snap = breaker.snapshot()
    assert snap == BreakerSnapshot(
        state=OPEN,
        failure_count=2,
        success_count=0,
        last_failure_time=clock.now,
        opened_at=clock.now,
        version=0,
        cause="failure_threshold",
    )


# -- retry after ---------------------------------------------------------------------------


def test_retry_after_counts_down_the_open_period(clock: FakeClock) -> None:
    breaker = make_breaker(clock, timeout_seconds=10)
    assert breaker.retry_after() == 0
    assert breaker.retry_after_header() == 1
    open_breaker(breaker)
    assert breaker.retry_after() == pytest.approx(10)
    assert breaker.retry_after_header() == 10
    clock.advance(2.5)
    assert breaker.retry_after() == pytest.approx(7.5)
    assert breaker.retry_after_header() == 8  # rounded up, never early
    clock.advance(7.4)
    assert breaker.retry_after_header() == 1
    clock.advance(5)
    assert breaker.retry_after() == 0
    assert breaker.retry_after_header() == 1


def test_retry_after_header_is_a_whole_number_of_seconds(clock: FakeClock) -> None:
    breaker = make_breaker(clock, timeout_seconds=3.7)
    open_breaker(breaker)
    for _ in range(40):
        header = breaker.retry_after_header()
        assert isinstance(header, int)
        assert header >= 1
        assert header >= breaker.retry_after()
        clock.advance(0.1)


def test_retry_after_while_probes_are_out(clock: FakeClock) -> None:
    breaker = make_breaker(clock, half_open_max_calls=1)
    half_open(breaker, clock)
    assert breaker.acquire() is None
    assert breaker.retry_after() > 0
    assert breaker.retry_after_header() >= 1


# -- on_transition -------------------------------------------------------------------------


def test_on_transition_is_called_once_per_transition_with_the_previous_state(
    clock: FakeClock,
) -> None:
    transitions = Transitions()
    breaker = make_breaker(clock, transitions, failure_threshold=2, success_threshold=1)
    succeed(breaker, 3)
    assert transitions.seen == []
    fail(breaker, 2)
    assert transitions.seen == [(CLOSED, OPEN)]
    for _ in range(5):
        assert breaker.acquire() is None
    clock.advance(10)
    probe = permit(breaker)
    assert breaker.acquire() is None
    assert transitions.seen == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]
    breaker.record(probe, failed=True)
    clock.advance(10)
    probe = permit(breaker)
    breaker.record(probe, failed=False)
    assert transitions.seen == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]


def test_on_transition_sees_the_new_state_applied(clock: FakeClock) -> None:
    seen: list[tuple[CircuitState, int, float | None]] = []

    def listener(breaker: CircuitBreaker, previous: CircuitState) -> None:
        seen.append((breaker.state, breaker.generation, breaker.opened_at))

    breaker = CircuitBreaker("svc", make_policy(failure_threshold=1), clock=clock)
    breaker.on_transition = listener
    fail(breaker)
    assert seen == [(OPEN, breaker.generation, clock.now)]


# -- snapshot / restore --------------------------------------------------------------------


def test_restore_round_trips_a_snapshot(clock: FakeClock) -> None:
    source = make_breaker(clock, failure_threshold=2)
    fail(source, 2)
    target = make_breaker(clock, failure_threshold=2)
    assert target.restore(source.snapshot()) is True
    assert target.snapshot() == source.snapshot()


def test_restore_open_honours_the_stored_open_period(clock: FakeClock) -> None:
    transitions = Transitions()
    breaker = make_breaker(clock, transitions, timeout_seconds=10)
    opened_at = clock.now - 4
    changed = breaker.restore(
        BreakerSnapshot(
            state=OPEN,
            failure_count=7,
            last_failure_time=opened_at,
            opened_at=opened_at,
            version=3,
        )
    )
    assert changed is True
    assert transitions.seen == []  # the fleet's transition, not this breaker's
    assert breaker.state is OPEN
    assert (breaker.failure_count, breaker.version) == (7, 3)
    assert breaker.acquire() is None
    assert breaker.retry_after() == pytest.approx(6)
    clock.advance(6)
    assert breaker.acquire() is not None
    assert breaker.state is HALF_OPEN


def test_restore_open_without_opened_at_starts_the_period_now(clock: FakeClock) -> None:
    breaker = make_breaker(clock, timeout_seconds=10)
    breaker.restore(BreakerSnapshot(state=OPEN, failure_count=5))
    assert breaker.acquire() is None
    clock.advance(9.9)
    assert breaker.acquire() is None
    clock.advance(0.1)
    assert breaker.acquire() is not None


def test_restore_makes_permits_in_flight_stale(clock: FakeClock) -> None:
    breaker = make_breaker(clock, failure_threshold=1)
    early = permit(breaker)
    breaker.restore(BreakerSnapshot(state=OPEN, opened_at=clock.now, failure_count=1))
    before = breaker.snapshot()
    breaker.record(early, failed=True)
    assert breaker.snapshot() == before


def test_restore_closed_closes_an_open_breaker(clock: FakeClock) -> None:
    breaker = make_breaker(clock)
    open_breaker(breaker)
    assert breaker.restore(BreakerSnapshot(state=CLOSED)) is True
    assert breaker.state is CLOSED
    assert breaker.acquire() is not None


def test_restore_half_open_lets_a_probe_through(clock: FakeClock) -> None:
    breaker = make_breaker(clock, half_open_max_calls=1)
    breaker.restore(BreakerSnapshot(state=HALF_OPEN, failure_count=5))
    probe = permit(breaker)
    assert breaker.acquire() is None
    breaker.record(probe, failed=False)
    assert breaker.state is CLOSED


def test_restore_same_state_reports_no_change(clock: FakeClock) -> None:
    breaker = make_breaker(clock)
    assert breaker.restore(BreakerSnapshot(state=CLOSED, version=2)) is False
    assert breaker.version == 2
    assert breaker.state is CLOSED
