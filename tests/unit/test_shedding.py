"""The adaptive mode's probability and health: properties of the formula, injected clock and
random source."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway_breaker.policy import Policy
from gateway_breaker.shedding import FleetCounts, Shedder, health, rejection_probability

policies = st.builds(
    Policy,
    mode=st.just("adaptive"),
    min_calls=st.integers(1, 200),
    success_rate_target=st.floats(0.05, 1.0),
    aggression=st.floats(1.0, 10.0),
    max_rejection=st.floats(0.0, 1.0),
)
counts = st.integers(0, 100_000)


@given(policies, counts, counts, st.integers(0, 1000))
def test_more_failures_never_shed_less(
    policy: Policy, calls: int, successes: int, more: int
) -> None:
    successes = min(successes, calls)
    fewer = min(successes, more)  # as many calls, `fewer` more of them failed
    assert rejection_probability(calls, successes - fewer, policy) >= rejection_probability(
        calls, successes, policy
    )


@given(policies, counts, counts)
def test_zero_at_or_above_target(policy: Policy, calls: int, successes: int) -> None:
    successes = min(successes, calls)
    if calls and successes / calls >= policy.success_rate_target:
        assert rejection_probability(calls, successes, policy) == 0.0
        assert health(calls, successes, policy) == 1.0


@given(policies, counts, counts)
def test_capped_at_max_rejection(policy: Policy, calls: int, successes: int) -> None:
    p = rejection_probability(calls, min(successes, calls), policy)
    assert 0.0 <= p <= policy.max_rejection
    assert 0.0 <= health(calls, min(successes, calls), policy) <= 1.0


@given(policies, counts)
def test_nothing_below_min_calls(policy: Policy, successes: int) -> None:
    calls = policy.min_calls - 1
    assert rejection_probability(calls, min(successes, calls), policy) == 0.0
    assert health(calls, 0, policy) == 1.0


def test_the_issue_figures() -> None:
    policy = Policy(mode="adaptive")
    # 40% failing: (1000 - 600 / 0.95) / 1001 = 0.368; health 0.6 / 0.95 = 0.63.
    assert rejection_probability(1000, 600, policy) == pytest.approx(0.368, abs=0.001)
    assert health(1000, 600, policy) == pytest.approx(0.632, abs=0.001)
    assert rejection_probability(1000, 0, policy) == 0.8  # capped
    steep = Policy(mode="adaptive", aggression=2.0)
    assert rejection_probability(1000, 600, steep) == pytest.approx(0.368**0.5, abs=0.001)


def test_shedder_uses_the_injected_random_source() -> None:
    draws = iter([0.1, 0.5, 0.36, 0.37])
    shedder = Shedder(rng=lambda: next(draws))
    assert not shedder.sheds()  # p = 0: no draw at all
    shedder.update(1000, 600, Policy(mode="adaptive"))
    assert [shedder.sheds() for _ in range(4)] == [True, False, True, False]


def test_fleet_counts_are_used_only_while_fresh() -> None:
    now = [100.0]
    fleet = FleetCounts(clock=lambda: now[0])
    assert not fleet.fresh(10.0)
    fleet.observe(50, 80)  # successes above calls (a torn read) are clamped
    assert (fleet.calls, fleet.successes) == (50, 50)
    now[0] = 109.0
    assert fleet.fresh(10.0)
    now[0] = 111.0
    assert not fleet.fresh(10.0)
    fleet.observe(10, 5)
    fleet.forget()
    assert not fleet.fresh(10.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mode", "brownout"),
        ("success_rate_target", 0),
        ("success_rate_target", 1.5),
        ("aggression", 0.5),
        ("max_rejection", 1.2),
        ("max_rejection", -0.1),
    ],
)
def test_bad_fields_are_named(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        Policy(**{field: value})  # type: ignore[arg-type]
