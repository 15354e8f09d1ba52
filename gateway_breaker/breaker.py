"""CircuitBreaker: the pure state machine of one service. No I/O; the clock is injected."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from gateway_breaker.policy import Policy
from gateway_breaker.window import RollingWindow

Clock = Callable[[], float]


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# Plain module names for the request path: an enum member looked up on its class costs more.
_CLOSED, _OPEN, _HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """What a breaker shares with the fleet: the seed's fields plus the store's version.

    Times are Unix seconds on the breaker's clock; None when it never happened.
    """

    state: CircuitState
    failure_count: int = 0
    success_count: int = 0
    last_failure_time: float | None = None
    opened_at: float | None = None
    version: int = 0
    open_seconds: float | None = None
    """Length of the current open period when it differs from the policy's (backoff)."""


class Permit:
    """Leave to make one call: report its outcome with `record`, or hand it back with `release`.

    A permit belongs to the generation that issued it; after a transition it counts for nothing.
    """

    __slots__ = ("done", "generation", "lease", "probe", "started")

    def __init__(self, generation: int, probe: bool, started: float) -> None:
        self.generation = generation
        self.probe = probe
        self.started = started
        self.done = False
        self.lease: str | None = None  # fleet-wide probe slot held for this call, if any


TransitionListener = Callable[["CircuitBreaker", CircuitState], None]
ProbeListener = Callable[["CircuitBreaker", Permit], None]


class CircuitBreaker:
    """Closed -> open on too many failures; open -> half-open after a timeout; half-open probes
    close it again or reopen it.

    Use it in two phases: `acquire()` before the call (None means rejected), then
    `record(permit, failed)` after it, or `release(permit)` when the call never ran to an outcome
    (cancelled, client gone). Every transition bumps `generation` and calls `on_transition`.
    """

    __slots__ = (
        "_in_flight",
        "_probe_hold_until",
        "_probes",
        "_random",
        "_slow",
        "_window",
        "clock",
        "failure_codes",
        "failure_count",
        "generation",
        "last_failure_time",
        "name",
        "on_probe_done",
        "on_transition",
        "open_seconds",
        "open_until",
        "opened_at",
        "policy",
        "probed_period",
        "state",
        "success_count",
        "version",
    )

    def __init__(
        self,
        name: str,
        policy: Policy,
        *,
        clock: Clock = time.time,
        on_transition: TransitionListener | None = None,
        on_probe_done: ProbeListener | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.name = name
        self.policy = policy
        self.clock = clock
        self.on_transition = on_transition
        self.on_probe_done = on_probe_done
        self._random = rng
        self.state = CircuitState.CLOSED
        self.failure_count = 0
        self.success_count = 0
        self.last_failure_time: float | None = None
        self.opened_at: float | None = None
        self.open_until = 0.0
        self.probed_period: float | None = None  # opened_at of the period the last probe ended
        self.open_seconds = policy.timeout_seconds
        self._probe_hold_until = 0.0  # another instance holds the fleet's probe slots
        self.generation = 0
        self.version = 0  # version of the stored state this breaker last agreed with
        self._in_flight = 0  # probes out while half-open
        self._probes: dict[Permit, None] = {}  # those probes, oldest first
        self._window = RollingWindow(policy.window_seconds)
        self._slow = policy.slow_call_seconds
        self.failure_codes = policy.failure_status_codes  # HTTP statuses that are failures

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name} {self.state.value} gen={self.generation}>"

    # -- the request path --------------------------------------------------------------------

    def acquire(self) -> Permit | None:
        """A permit for one call, or None when the call must be rejected."""
        state = self.state
        if state is _CLOSED:
            # The clock is read only when a slow-call rule needs the start time.
            started = 0.0 if self._slow is None else self.clock()
            return Permit(self.generation, False, started)
        now = self.clock()
        if state is _OPEN:
            if now < self.open_until:
                return None
            self._transition(_HALF_OPEN, now)
        if self._in_flight >= self.policy.half_open_max_calls and (
            not self._expire_probe(now) or self.state is not _HALF_OPEN
        ):
            return None
        if now < self._probe_hold_until:
            return None
        self._in_flight += 1
        permit = Permit(self.generation, True, now)
        self._probes[permit] = None
        return permit

    def record(self, permit: Permit, failed: bool) -> None:
        """Report the outcome of a permitted call. Stale permits change nothing."""
        if permit.done:
            return
        permit.done = True
        if permit.generation != self.generation:
            self._probe_done(permit)
            return
        now = self.clock()
        slow = self._slow
        if slow is not None and not failed and now - permit.started > slow:
            failed = True
        if permit.probe:
            self._in_flight -= 1
            self._probes.pop(permit, None)
            self._probe_done(permit)
        if failed:
            self._on_failure(now)
        elif self.state is _CLOSED:
            # The common case, inline: a success on a closed breaker.
            self.success_count += 1
            self.failure_count = 0
            self._window.record(now, False)
        else:
            self._on_success(now)

    def release(self, permit: Permit) -> None:
        """Give back a permit whose call produced no outcome; its probe slot is freed."""
        if permit.done:
            return
        permit.done = True
        if permit.probe and permit.generation == self.generation:
            self._in_flight -= 1
            self._probes.pop(permit, None)
        self._probe_done(permit)

    def probe_deadline(self) -> float:
        """Longest a probe may take: `slow_call_seconds` (a slower probe has failed), else
        `probe_lease_seconds`. Past it, the probe's slot is free again."""
        slow = self._slow
        return self.policy.probe_lease_seconds if slow is None else slow

    def _expire_probe(self, now: float) -> bool:
        """Free the slot of the oldest probe if it ran past its deadline; whether one was."""
        oldest = next(iter(self._probes), None)
        if oldest is None or now - oldest.started <= self.probe_deadline():
            return False
        del self._probes[oldest]
        self._in_flight -= 1
        oldest.generation = -1  # its outcome, if it ever comes, counts for nothing
        self._probe_done(oldest)  # and the fleet's slot is given back
        oldest.lease = None
        if self._slow is not None:
            self._on_failure(now)  # slower than slow_call_seconds: it failed; reopens
        return True

    def hold_probes(self, seconds: float) -> None:
        """Let no probe through for `seconds`: another instance holds the probe slots."""
        self._probe_hold_until = self.clock() + seconds

    def _probe_done(self, permit: Permit) -> None:
        if permit.lease is not None and self.on_probe_done is not None:
            self.on_probe_done(self, permit)

    def retry_after(self) -> float:
        """Seconds until a call may be let through again (0 when it may be now)."""
        if self.state is _OPEN:
            return max(0.0, self.open_until - self.clock())
        if self.state is _HALF_OPEN:
            held = self._probe_hold_until - self.clock()
            if held > 0:
                return held  # another instance is probing
            if self._in_flight >= self.policy.half_open_max_calls:
                return 1.0  # a probe is out; its outcome decides
        return 0.0

    def retry_after_header(self) -> int:
        """`retry_after()` as whole seconds for a Retry-After header: at least 1."""
        return max(1, math.ceil(self.retry_after()))

    # -- outcomes --------------------------------------------------------------------------

    def _on_success(self, now: float) -> None:
        self.success_count += 1
        self.failure_count = 0
        if self.state is CircuitState.HALF_OPEN:
            if self.success_count >= self.policy.success_threshold:
                self._transition(CircuitState.CLOSED, now)
        else:
            self._window.record(now, False)

    def _on_failure(self, now: float) -> None:
        self.failure_count += 1
        self.success_count = 0
        self.last_failure_time = now
        if self.state is CircuitState.HALF_OPEN:
            self._transition(CircuitState.OPEN, now)
            return
        window = self._window
        window.record(now, True)
        policy = self.policy
        if self.failure_count >= policy.failure_threshold or (
            window.calls >= policy.min_calls
            and window.failures >= policy.error_rate_threshold * window.calls
        ):
            self._transition(CircuitState.OPEN, now)

    def _transition(self, state: CircuitState, now: float) -> None:
        previous = self.state
        self.state = state
        self.generation += 1
        self._in_flight = 0
        self._probes.clear()
        self._probe_hold_until = 0.0
        if previous is CircuitState.HALF_OPEN:
            self.probed_period = self.opened_at
        if state is CircuitState.OPEN:
            self.open_seconds = self._next_open_seconds(previous)
            self.opened_at = now
            self.open_until = now + self.open_seconds
            self.success_count = 0
        elif state is CircuitState.HALF_OPEN:
            self.success_count = 0
        else:
            self.failure_count = 0
            self.success_count = 0
            self._window.reset()
        if self.on_transition is not None:
            self.on_transition(self, previous)

    def _next_open_seconds(self, previous: CircuitState) -> float:
        """The policy's timeout; with backoff, doubled (with jitter) on each failed probe."""
        policy = self.policy
        if policy.max_timeout_seconds is None or previous is not CircuitState.HALF_OPEN:
            return policy.timeout_seconds
        target = min(policy.max_timeout_seconds, max(self.open_seconds, policy.timeout_seconds) * 2)
        # Up to 20% less, so that breakers opened together do not probe together.
        return max(policy.timeout_seconds, target * (1 - 0.2 * self._random()))

    # -- sharing ---------------------------------------------------------------------------

    def snapshot(self) -> BreakerSnapshot:
        return BreakerSnapshot(
            state=self.state,
            failure_count=self.failure_count,
            success_count=self.success_count,
            last_failure_time=self.last_failure_time,
            opened_at=self.opened_at,
            version=self.version,
            open_seconds=(
                self.open_seconds if self.open_seconds != self.policy.timeout_seconds else None
            ),
        )

    def restore(self, snapshot: BreakerSnapshot) -> bool:
        """Adopt a state another instance stored. Returns whether the state changed.

        On a change, calls in flight count for nothing afterwards. No transition is reported:
        this transition is already the fleet's.
        """
        changed = snapshot.state is not self.state
        self.state = snapshot.state
        self.failure_count = snapshot.failure_count
        self.success_count = snapshot.success_count
        self.last_failure_time = snapshot.last_failure_time
        self.opened_at = snapshot.opened_at
        self.version = snapshot.version
        # Clamped to the policy: no stored value holds the breaker open longer than it allows.
        policy = self.policy
        longest = max(policy.timeout_seconds, policy.max_timeout_seconds or 0.0)
        self.open_seconds = min(
            max(snapshot.open_seconds or policy.timeout_seconds, policy.timeout_seconds), longest
        )
        if snapshot.state is CircuitState.OPEN:
            now = self.clock()
            start = snapshot.opened_at if snapshot.opened_at is not None else now
            self.open_until = min(start, now) + self.open_seconds
        if changed:
            self.generation += 1
            self._in_flight = 0
            self._probes.clear()
            self._probe_hold_until = 0.0
            if snapshot.state is CircuitState.CLOSED:
                self._window.reset()
        return changed
