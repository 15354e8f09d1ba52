"""Read-only views of the breakers for operators: what the admin API, metrics and CLI show."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway_breaker.breaker import CircuitBreaker, ManualMode
from gateway_breaker.policy import Policy

MANUAL_CAUSES = frozenset({"manual", "manual_released", "manual_expired", "reset", "policy"})
"""Causes of transitions an operator made (origin `manual`)."""


def policy_json(policy: Policy) -> dict[str, Any]:
    """A policy as plain JSON: status codes as the ranges they were written as."""
    doc = policy.model_dump(mode="json", exclude={"prefix", "upstream"})
    doc["failure_status_codes"] = policy.status_code_ranges()
    return doc


@dataclass(frozen=True, slots=True)
class BreakerView:
    """One breaker as this instance sees it."""

    service: str
    state: str
    """One of EFFECTIVE_STATES: the manual mode when one is set, else the automatic state."""
    automatic_state: str
    failure_count: int
    success_count: int
    failure_rate: float | None
    window_calls: int
    window_failures: int
    calls: Mapping[str, int]
    last_failure_time: float | None
    opened_at: float | None
    retry_after: float
    version: int
    manual: ManualMode | None
    policy: Policy
    policy_overridden: bool = False
    local: bool = False
    health: float = 1.0
    """The window's success rate over `success_rate_target`, at most 1 (1.0 below min_calls)."""
    rejection_probability: float = 0.0
    """Share of calls the adaptive mode sheds now (computed, not applied, under metrics_only)."""

    @classmethod
    def of(cls, breaker: CircuitBreaker, *, policy_overridden: bool = False) -> BreakerView:
        breaker.expire_manual()
        now = breaker.clock()
        calls, failures = breaker.window_counts(now)
        return cls(
            service=breaker.name,
            state=breaker.effective_state,
            automatic_state=breaker.state.value,
            failure_count=breaker.failure_count,
            success_count=breaker.success_count,
            failure_rate=breaker.failure_rate(now),
            window_calls=calls,
            window_failures=failures,
            calls={
                "success": breaker.calls_success,
                "failure": breaker.calls_failure,
                "slow": breaker.calls_slow,
                "rejected": breaker.calls_rejected,
                "shed": breaker.calls_shed,
                "ignored": breaker.calls_ignored,
            },
            last_failure_time=breaker.last_failure_time,
            opened_at=breaker.opened_at,
            retry_after=round(breaker.retry_after(), 3),
            version=breaker.version,
            manual=breaker.manual,
            policy=breaker.policy,
            policy_overridden=policy_overridden,
            local=breaker.local,
            health=round(breaker.health(now), 4),
            rejection_probability=round(breaker.rejection_probability(now), 4),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "state": self.state,
            "automatic_state": self.automatic_state,
            "failure_count": self.failure_count,
            "success_count": self.success_count,
            "failure_rate": self.failure_rate,
            "window": {"calls": self.window_calls, "failures": self.window_failures},
            "calls": dict(self.calls),
            "last_failure_time": self.last_failure_time,
            "opened_at": self.opened_at,
            "retry_after": self.retry_after,
            "version": self.version,
            "manual": None if self.manual is None else self.manual.to_dict(),
            "policy": policy_json(self.policy),
            "policy_overridden": self.policy_overridden,
            "local": self.local,
            "health": self.health,
            "rejection_probability": self.rejection_probability,
        }


@dataclass(frozen=True, slots=True)
class TransitionEvent:
    """A change of a breaker's reported state: made here (`local`), adopted from another
    instance (`fleet`), or made by an operator (`manual`)."""

    service: str
    at: float
    from_state: str
    to_state: str
    cause: str
    origin: str
    instance: str
    version: int
    failure_count: int
    failure_rate: float | None = None
    reason: str | None = None
    id: int = 0
    """Position in this process's event sequence (0 for events read from the history)."""

    def to_dict(self) -> dict[str, Any]:
        rate = self.failure_rate
        return {
            "id": self.id,
            "service": self.service,
            "at": self.at,
            "from": self.from_state,
            "to": self.to_state,
            "cause": self.cause,
            "origin": self.origin,
            "instance": self.instance,
            "version": self.version,
            "failure_count": self.failure_count,
            "failure_rate": None if rate is None or math.isnan(rate) else rate,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class InstanceView:
    """A live gateway instance, as it last registered itself in the store."""

    id: str
    host: str
    pid: int
    started_at: float
    last_seen: float
    version: str
    breakers: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    """service -> (reported state, stored version it agrees with)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "host": self.host,
            "pid": self.pid,
            "started_at": self.started_at,
            "last_seen": self.last_seen,
            "version": self.version,
            "breakers": {s: {"state": st, "version": v} for s, (st, v) in self.breakers.items()},
        }


@dataclass(frozen=True, slots=True)
class FleetView:
    """Every live instance and what the store holds, so a stale or split instance shows."""

    instances: list[InstanceView]
    store: Mapping[str, tuple[str, int]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "instances": [i.to_dict() for i in self.instances],
            "store": {s: {"state": st, "version": v} for s, (st, v) in self.store.items()},
        }
