"""The adaptive mode's rejection probability and the health score (pure; clock and random
injected).

Envoy's admission-control formula on a window's calls `n` and successes `s`:
`p = min(max_rejection, max(0, (n - s / success_rate_target) / (n + 1)) ** (1 / aggression))`,
0 below `min_calls`. Health is `min(1, (s / n) / success_rate_target)`, 1.0 below `min_calls`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from gateway_breaker.policy import Policy

Clock = Callable[[], float]


def rejection_probability(calls: int, successes: int, policy: Policy) -> float:
    """Share of calls to shed given `calls` and `successes` in the window (0 below min_calls)."""
    if calls < policy.min_calls or calls <= 0:
        return 0.0
    excess = (calls - successes / policy.success_rate_target) / (calls + 1)
    if excess <= 0:
        return 0.0
    shed: float = excess ** (1 / policy.aggression)
    return min(policy.max_rejection, shed)


def health(calls: int, successes: int, policy: Policy) -> float:
    """The window's success rate over the target, at most 1 (1.0 below min_calls)."""
    if calls < policy.min_calls or calls <= 0:
        return 1.0
    return min(1.0, max(0.0, successes / calls / policy.success_rate_target))


class FleetCounts:
    """The fleet's (calls, successes) as the store last reported them, usable while fresh.

    Counts older than `window_seconds` say nothing of now (Redis unreachable, or this instance
    stopped sending because nothing fails): the instance's own window decides then.
    """

    __slots__ = ("_at", "_clock", "calls", "successes")

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._at: float | None = None
        self.calls = self.successes = 0

    def observe(self, calls: int, successes: int) -> None:
        self.calls, self.successes = max(0, calls), max(0, min(successes, calls))
        self._at = self._clock()

    def forget(self) -> None:
        self._at = None

    def fresh(self, max_age: float, now: float | None = None) -> bool:
        if self._at is None:
            return False
        age = (self._clock() if now is None else now) - self._at
        return -max_age <= age <= max_age


class Shedder:
    """Sheds each call with the probability the counts give (`decide`), with `rng` injected."""

    __slots__ = ("_rng", "probability")

    def __init__(self, rng: Callable[[], float] = random.random) -> None:
        self._rng = rng
        self.probability = 0.0

    def update(self, calls: int, successes: int, policy: Policy) -> float:
        """Re-evaluate the probability from new counts; returns it."""
        self.probability = rejection_probability(calls, successes, policy)
        return self.probability

    def sheds(self) -> bool:
        """Whether to shed one call now."""
        p = self.probability
        return p > 0.0 and self._rng() < p
