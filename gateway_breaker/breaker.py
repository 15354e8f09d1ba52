"""CircuitBreaker: the pure state machine of one service. No I/O; the clock is injected."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from gateway_breaker.policy import Policy
from gateway_breaker.shedding import FleetCounts, Shedder, health, rejection_probability
from gateway_breaker.window import RollingWindow

Clock = Callable[[], float]


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


MANUAL_MODES = ("forced_open", "disabled", "metrics_only")
"""Modes an operator can put a breaker in, above its automatic state machine."""
EFFECTIVE_STATES = ("closed", "open", "half_open", *MANUAL_MODES)
"""What a breaker reports: its automatic state, or the manual mode that overrides it."""
OUTCOMES = ("success", "failure", "slow", "rejected", "shed", "ignored")
"""How a call is counted: `slow` is a failure by the slow-call rule; `shed` turned away by the
adaptive mode while closed; `ignored` counted for nothing (client gone, cancelled, started
before a transition)."""


@dataclass(frozen=True, slots=True)
class ManualMode:
    """An operator's override: `forced_open` rejects everything, `disabled` lets everything
    through and counts nothing, `metrics_only` runs the state machine but never rejects.

    `until` (Unix seconds, the breaker's clock) ends it by itself; None keeps it until lifted.
    """

    mode: str
    until: float | None = None
    reason: str | None = None
    since: float | None = None
    """When it was set (the breaker's clock)."""

    def __post_init__(self) -> None:
        if self.mode not in MANUAL_MODES:
            raise ValueError(f"mode must be one of {', '.join(MANUAL_MODES)}, got {self.mode!r}")

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "until": self.until, "reason": self.reason, "since": self.since}


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
    manual: ManualMode | None = None
    """The operator's override, if any."""
    cause: str | None = None
    """Why the last transition happened (`failure_threshold`, `manual`, ...)."""
    closed_at: float | None = None
    """When a probe closed the breaker (the start of the recovery ramp); None otherwise."""


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


# Called after every change of the breaker's reported state. `breaker.last_from`,
# `breaker.last_to`, `breaker.last_cause` and `breaker.last_reason` describe it.
TransitionListener = Callable[["CircuitBreaker", CircuitState], None]
ProbeListener = Callable[["CircuitBreaker", Permit], None]
# Called when a fleet-counting breaker has counts the fleet has not seen yet (O(1), no I/O).
EvidenceListener = Callable[["CircuitBreaker"], None]


_new_object = object.__new__
_FREE_PASS = Permit(-1, False, 0.0)
_FREE_PASS.done = True  # a call let through by a manual mode: its outcome counts for nothing


class CircuitBreaker:
    """Closed -> open on too many failures; open -> half-open after a timeout; half-open probes
    close it again or reopen it.

    Use it in two phases: `acquire()` before the call (None means rejected), then
    `record(permit, failed)` after it, or `release(permit)` when the call never ran to an outcome
    (cancelled, client gone). Every transition bumps `generation` and calls `on_transition`.
    """

    __slots__ = (
        "_adaptive",
        "_fleet",
        "_fleet_counts",
        "_gated",
        "_in_flight",
        "_probe_hold_until",
        "_probes",
        "_ramp_from",
        "_ramp_until",
        "_random",
        "_shedder",
        "_shedding",
        "_slow",
        "_window",
        "calls_failure",
        "calls_ignored",
        "calls_rejected",
        "calls_shed",
        "calls_slow",
        "calls_success",
        "clock",
        "closed_at",
        "failure_codes",
        "failure_count",
        "fleet_counting",
        "generation",
        "last_cause",
        "last_failure_time",
        "last_from",
        "last_reason",
        "last_to",
        "local",
        "manual",
        "name",
        "on_evidence",
        "on_probe_done",
        "on_transition",
        "open_seconds",
        "open_until",
        "opened_at",
        "policy",
        "probed_period",
        "reported",
        "shed_last",
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
        on_evidence: EvidenceListener | None = None,
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
        self.manual: ManualMode | None = None
        # Totals since start, by outcome (OUTCOMES): read by metrics at scrape time.
        self.calls_success = self.calls_failure = self.calls_slow = 0
        self.calls_rejected = self.calls_ignored = 0
        # The last change of the reported state: from, to, why (see TransitionListener).
        self.last_from = self.last_to = CircuitState.CLOSED.value
        self.last_cause: str | None = None
        self.last_reason: str | None = None
        # Fleet evidence: while `fleet_counting`, failures do not open the breaker by
        # themselves; they are counts for the fleet's decision (`on_evidence` says there are
        # new ones). `reported`: the fleet holds counts of ours that a success changes.
        self.on_evidence = on_evidence
        self._fleet = False  # a store that counts for the fleet is reachable
        self.fleet_counting = False
        self.reported = False
        self.local = False  # open for this instance only (a quorum was not met)
        # Recovery ramp: after a close, calls are let through with a share rising from 0 to 1
        # between `_ramp_from` and `_ramp_until`. `_gated`: a ramp or a manual mode is active,
        # so the closed fast path of `acquire` has one flag to test.
        self.closed_at: float | None = None
        self._ramp_from = self._ramp_until = 0.0
        self._gated = False
        # Adaptive mode: `_shedding` while the window may hold failures, so that `acquire`
        # (off the fast path, through `_gated`) weighs the shedding probability; it ends when
        # the probability is 0. `shed_last`: the last rejection was a shed call.
        self._adaptive = policy.mode == "adaptive"
        self._shedding = False
        self._shedder = Shedder(rng)
        self._fleet_counts = FleetCounts(clock)
        self.calls_shed = 0
        self.shed_last = False

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name} {self.state.value} gen={self.generation}>"

    # -- the request path --------------------------------------------------------------------

    def acquire(self) -> Permit | None:
        """A permit for one call, or None when the call must be rejected."""
        state = self.state
        if state is _CLOSED and not self._gated:
            # Permit.__init__'s fields, set here: calling a class with a Python __init__ costs
            # as much as the rest of this path. The clock is read only for a slow-call rule.
            permit = _new_object(Permit)
            permit.generation = self.generation
            permit.probe = permit.done = False
            permit.started = 0.0 if self._slow is None else self.clock()
            permit.lease = None
            return permit
        now = self.clock()
        if self._ramp_until and self.manual is None and not self._ramp_admits(now):
            self.calls_rejected += 1
            self.shed_last = False
            return None
        if self._shedding and self._sheds(now):
            return None
        manual = self.manual
        if manual is not None:
            if manual.until is not None and now >= manual.until:
                self.set_manual(None, "manual_expired")
            elif manual.mode == "forced_open":
                self.calls_rejected += 1
                return None
            elif manual.mode == "disabled":
                return _FREE_PASS
            else:  # metrics_only: the state machine runs, but nothing is rejected
                return self._automatic_acquire(self.state, now) or _FREE_PASS
        granted = self._automatic_acquire(self.state, now)
        if granted is None:
            self.calls_rejected += 1
        return granted

    def _automatic_acquire(self, state: CircuitState, now: float) -> Permit | None:
        if state is _CLOSED:
            return Permit(self.generation, False, now)
        if state is _OPEN:
            if now < self.open_until:
                return None
            self._transition(_HALF_OPEN, now, "timeout_elapsed")
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
            self.calls_ignored += 1  # started before a transition: says nothing of this state
            self._probe_done(permit)
            return
        now = self.clock()
        if permit.probe:
            self._in_flight -= 1
            self._probes.pop(permit, None)
            self._probe_done(permit)
        slow = self._slow
        if failed:
            self.calls_failure += 1
            self._on_failure(now, None)
        elif slow is not None and now - permit.started > slow:
            self.calls_slow += 1
            self._on_failure(now, "slow_calls")
        elif self.state is _CLOSED:
            # The common case, inline: a success on a closed breaker.
            self.calls_success += 1
            self.success_count += 1
            self.failure_count = 0
            self._window.record(now, False)
            if self.reported:
                self._new_evidence()  # the fleet holds a run of ours this success ended
        else:
            self.calls_success += 1
            self._on_success(now)

    def release(self, permit: Permit) -> None:
        """Give back a permit whose call produced no outcome; its probe slot is freed."""
        if permit.done:
            return
        permit.done = True
        self.calls_ignored += 1
        if permit.probe and permit.generation == self.generation:
            self._in_flight -= 1
            self._probes.pop(permit, None)
        self._probe_done(permit)

    def refuse(self, permit: Permit) -> None:
        """Take back a permit whose call is rejected after all (no fleet-wide probe slot)."""
        if permit.done:
            return
        self.release(permit)
        self.calls_ignored -= 1
        self.calls_rejected += 1

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
            self.calls_slow += 1
            self._on_failure(now, "slow_calls")  # slower than slow_call_seconds: it failed
        return True

    def hold_probes(self, seconds: float) -> None:
        """Let no probe through for `seconds`: another instance holds the probe slots."""
        self._probe_hold_until = self.clock() + seconds

    def _ramp_admits(self, now: float) -> bool:
        """Whether the recovery ramp lets a call through now (ending the ramp when it is over)."""
        if now >= self._ramp_until or self.state is not _CLOSED:
            self._end_ramp()
            return True
        span = self._ramp_until - self._ramp_from
        return self._random() * span < now - self._ramp_from

    def start_ramp(self, closed_at: float) -> None:
        """Ramp calls up from 0 to 100% over `recovery_seconds` from `closed_at`."""
        recovery = self.policy.recovery_seconds
        closed_at = min(closed_at, self.clock())  # a start in the future would never ramp up
        if recovery is None or self.state is not _CLOSED or closed_at + recovery <= self.clock():
            return
        self._ramp_from, self._ramp_until = closed_at, closed_at + recovery
        self._gated = True

    def _end_ramp(self) -> None:
        self._ramp_from = self._ramp_until = 0.0
        self._gated = self.manual is not None or self._shedding

    # -- adaptive shedding -----------------------------------------------------------------

    def _sheds(self, now: float) -> bool:
        """Adaptive mode: whether to shed this call; shedding ends when its probability is 0.
        Under a manual mode the probability is computed (metrics_only: a shadow run), never
        applied."""
        if self.state is not _CLOSED or self._update_shedding(now) <= 0.0:
            self._stop_shedding()
            return False
        if self.manual is not None or not self._shedder.sheds():
            return False
        self.calls_shed += 1
        self.shed_last = True
        return True

    def _start_shedding(self) -> None:
        if self._adaptive and self.state is _CLOSED:
            self._shedding = self._gated = True

    def _stop_shedding(self) -> None:
        self._shedding = False
        self._shedder.probability = 0.0
        self._gated = self.manual is not None or bool(self._ramp_until)

    def _shedding_counts(self, now: float) -> tuple[int, int]:
        """(calls, successes) shedding and health weigh: the fleet's while fresh, else ours."""
        fleet = self._fleet_counts
        if self.fleet_counting and fleet.fresh(self.policy.window_seconds, now):
            return fleet.calls, fleet.successes
        calls, failures = self._window.counts(now)
        return calls, calls - failures

    def _update_shedding(self, now: float) -> float:
        return self._shedder.update(*self._shedding_counts(now), self.policy)

    def observe_fleet(self, calls: int, failures: int) -> None:
        """The fleet's window counts, as the store summed them (the sync calls this)."""
        self._fleet_counts.observe(calls, calls - failures)
        if failures > 0:
            self._start_shedding()

    def rejection_probability(self, now: float | None = None) -> float:
        """Share of calls the adaptive mode sheds now (computed under metrics_only too; 0 in
        classic mode, and while open, half-open, forced open or disabled)."""
        manual = self.manual
        if not self._adaptive or self.state is not _CLOSED:
            return 0.0
        if manual is not None and manual.mode != "metrics_only":
            return 0.0
        now = self.clock() if now is None else now
        return rejection_probability(*self._shedding_counts(now), self.policy)

    def health(self, now: float | None = None) -> float:
        """The window's success rate over `success_rate_target`, at most 1 (1.0 below
        min_calls): the fleet's while this instance has its fresh counts, else its own."""
        now = self.clock() if now is None else now
        return health(*self._shedding_counts(now), self.policy)

    @property
    def ramping(self) -> bool:
        """Whether a recovery ramp is on (it ends at the first call after its time is up)."""
        return bool(self._ramp_until) and self.clock() < self._ramp_until

    def ramp_share(self, now: float | None = None) -> float:
        """Share of calls the recovery ramp lets through now (1.0 when no ramp is on)."""
        if not self._ramp_until:
            return 1.0
        now = self.clock() if now is None else now
        span = self._ramp_until - self._ramp_from
        return min(1.0, max(0.0, (now - self._ramp_from) / span))

    # -- fleet evidence ----------------------------------------------------------------------

    def set_fleet(self, available: bool) -> None:
        """Whether a store that counts for the fleet is reachable (the sync says so).

        Losing it, the breaker counts alone again, and opens now if its own counts say so.
        """
        self._fleet = available
        was = self.fleet_counting
        self.fleet_counting = available and self.policy.counting == "fleet"
        if was and not self.fleet_counting:
            self.reported = False
            self._check_own(self.clock(), None)

    def _new_evidence(self) -> None:
        if self.on_evidence is not None:
            self.on_evidence(self)

    def own_rule(self, now: float | None = None) -> str | None:
        """The rule this instance's own counts meet (`failure_threshold`, `error_rate`), if any."""
        policy = self.policy
        if self.failure_count >= policy.failure_threshold:
            return "failure_threshold"
        if self._adaptive:
            return None  # the adaptive mode sheds instead of the error-rate rule
        calls, failures = self._window.counts(self.clock() if now is None else now)
        if calls >= policy.min_calls and failures >= policy.error_rate_threshold * calls:
            return "error_rate"
        return None

    def _check_own(self, now: float, cause: str | None) -> None:
        if self.state is not _CLOSED or self.manual is not None:
            return
        rule = self.own_rule(now)
        if rule is not None:
            self._transition(_OPEN, now, cause or rule)

    def open_locally(self, cause: str) -> bool:
        """Open for this instance only: the fleet's quorum was not met. Returns whether it did."""
        if self.state is not _CLOSED or self.manual is not None:
            return False
        self.local = True
        self.reported = True  # our counts stay in the fleet's evidence until we close
        self._transition(_OPEN, self.clock(), cause)
        return True

    def _probe_done(self, permit: Permit) -> None:
        if permit.lease is not None and self.on_probe_done is not None:
            self.on_probe_done(self, permit)

    def retry_after(self) -> float:
        """Seconds until a call may be let through again (0 when it may be now)."""
        manual = self.manual
        if manual is not None:
            if manual.mode != "forced_open":
                return 0.0
            if manual.until is None:
                return max(self.policy.timeout_seconds, 1.0)  # no end known: ask again later
            return max(0.0, manual.until - self.clock())
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
                self._transition(CircuitState.CLOSED, now, "probe_succeeded")
        else:
            self._window.record(now, False)

    def _on_failure(self, now: float, cause: str | None) -> None:
        self.failure_count += 1
        self.success_count = 0
        self.last_failure_time = now
        if self.state is CircuitState.HALF_OPEN:
            self._transition(CircuitState.OPEN, now, "probe_failed")
            return
        window = self._window
        window.record(now, True)
        if self._adaptive and not self._shedding:
            self._start_shedding()
        if self.fleet_counting and self.manual is None:
            self._new_evidence()  # the fleet decides on every instance's counts
            # Our own counts alone decide without a round trip: with quorum 1 the fleet would
            # open on them (it opens now, for the fleet); above it, we open for ourselves.
            rule = self.own_rule(now)
            if rule is not None:
                if self.policy.quorum > 1:
                    self.open_locally(cause or rule)
                else:
                    self._transition(CircuitState.OPEN, now, cause or rule)
            return
        policy = self.policy
        if self.failure_count >= policy.failure_threshold:
            self._transition(CircuitState.OPEN, now, cause or "failure_threshold")
        elif (
            not self._adaptive
            and window.calls >= policy.min_calls
            and window.failures >= policy.error_rate_threshold * window.calls
        ):
            self._transition(CircuitState.OPEN, now, cause or "error_rate")

    def _transition(self, state: CircuitState, now: float, cause: str) -> None:
        previous = self.state
        self.state = state
        self.generation += 1
        self._in_flight = 0
        self._probes.clear()
        self._probe_hold_until = 0.0
        if previous is CircuitState.HALF_OPEN:
            self.probed_period = self.opened_at
        self._fleet_counts.forget()  # the fleet's counts of the last period
        self._stop_shedding()
        if self._ramp_until:
            self._end_ramp()
        self.closed_at = None
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
            self.closed_at = now
            self.start_ramp(now)
        self._notify(previous, previous.value, state.value, cause, None)
        if state is CircuitState.CLOSED and self.local:
            self.local = False  # the close was ours alone too; the fleet's counts follow
            if self.reported:
                self._new_evidence()

    def _notify(
        self, previous: CircuitState, old: str, new: str, cause: str, reason: str | None
    ) -> None:
        self.last_from, self.last_to, self.last_cause, self.last_reason = old, new, cause, reason
        if self.on_transition is not None:
            self.on_transition(self, previous)

    @property
    def effective_state(self) -> str:
        """The reported state: the manual mode when one is set, else the automatic state."""
        manual = self.manual
        return self.state.value if manual is None else manual.mode

    def window_counts(self, now: float | None = None) -> tuple[int, int]:
        """(calls, failures) in the rolling window."""
        return self._window.counts(self.clock() if now is None else now)

    def failure_rate(self, now: float | None = None) -> float | None:
        """The rolling window's failure ratio; None until `min_calls` calls are in it."""
        calls, failures = self.window_counts(now)
        if calls < self.policy.min_calls or calls == 0:
            return None
        return failures / calls

    # -- operator commands -----------------------------------------------------------------

    def set_manual(self, manual: ManualMode | None, cause: str, reason: str | None = None) -> None:
        """Put the breaker in a manual mode (None lifts it). Calls in flight count for nothing."""
        old = self.effective_state
        self.manual = manual
        self._gated = manual is not None or bool(self._ramp_until) or self._shedding
        self._forget_in_flight()
        self._notify(self.state, old, self.effective_state, cause, reason)

    def expire_manual(self) -> bool:
        """End a timed manual mode whose time is up. Returns whether it ended."""
        manual = self.manual
        if manual is None or manual.until is None or self.clock() < manual.until:
            return False
        self.set_manual(None, "manual_expired")
        return True

    def reset(self, reason: str | None = None) -> None:
        """Start over: closed, counters and window cleared, any manual mode lifted."""
        old = self.effective_state
        previous = self.state
        self.state = CircuitState.CLOSED
        self.manual = None
        self._stop_shedding()
        self._fleet_counts.forget()
        self._end_ramp()  # the operator starts over: no ramp
        self.closed_at = None
        self.local = False
        if self.reported:
            self._new_evidence()
        self.failure_count = self.success_count = 0
        self.last_failure_time = None
        self.opened_at = None
        self.open_until = 0.0
        self.open_seconds = self.policy.timeout_seconds
        self._window.reset()
        self._forget_in_flight()
        self._notify(previous, old, CircuitState.CLOSED.value, "reset", reason)

    def set_policy(self, policy: Policy) -> None:
        """Apply a new policy now. A changed window length restarts the rolling window."""
        if policy.window_seconds != self.policy.window_seconds:
            self._window = RollingWindow(policy.window_seconds)
        self.policy = policy
        self._slow = policy.slow_call_seconds
        self.failure_codes = policy.failure_status_codes
        self._adaptive = policy.mode == "adaptive"
        self._stop_shedding()
        self._start_shedding()  # adaptive: acquire weighs the window's counts (and stops at 0)
        self.set_fleet(self._fleet)  # the policy may turn fleet counting on or off
        if self.state is not CircuitState.OPEN:
            self.open_seconds = policy.timeout_seconds
        elif self.opened_at is not None:
            # A shorter timeout shortens the current open period too.
            longest = policy.max_timeout_seconds or policy.timeout_seconds
            self.open_seconds = min(self.open_seconds, longest)
            self.open_until = self.opened_at + self.open_seconds

    def _forget_in_flight(self) -> None:
        self.generation += 1
        self._in_flight = 0
        self._probes.clear()
        self._probe_hold_until = 0.0

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
            manual=self.manual,
            cause=self.last_cause,
            closed_at=self.closed_at if self.state is _CLOSED else None,
        )

    def restore(self, snapshot: BreakerSnapshot) -> bool:
        """Adopt a state another instance stored. Returns whether the state changed.

        On a change, calls in flight count for nothing afterwards. No transition is reported:
        this transition is already the fleet's.
        """
        # A breaker open for this instance only changes too: it becomes the fleet's.
        changed = snapshot.state is not self.state or snapshot.manual != self.manual or self.local
        old, previous = self.effective_state, self.state
        self.state = snapshot.state
        self.manual = snapshot.manual
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
        self._gated = self.manual is not None or bool(self._ramp_until) or self._shedding
        if changed:
            self.local = False  # the fleet's state replaces one of ours alone
            if snapshot.state is not CircuitState.CLOSED:
                self.reported = False  # the fleet opened: its evidence starts over
                self._end_ramp()
            self._forget_in_flight()
            self._fleet_counts.forget()
            self._stop_shedding()
            if snapshot.state is CircuitState.CLOSED:
                self._window.reset()
            self.last_from, self.last_to = old, self.effective_state
            metrics_only = self.manual is not None and self.manual.mode == "metrics_only"
            if metrics_only and old == self.last_to:
                self.last_from, self.last_to = previous.value, snapshot.state.value
            reason = self.manual.reason if self.manual is not None else None
            self.last_cause, self.last_reason = snapshot.cause or "restored", reason
        if snapshot.state is CircuitState.CLOSED and snapshot.closed_at != self.closed_at:
            self.closed_at = snapshot.closed_at
            self._end_ramp()
            if snapshot.closed_at is not None:
                self.start_ramp(snapshot.closed_at)  # the fleet ramps up together
        return changed
