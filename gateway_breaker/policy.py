"""Per-service breaker settings: thresholds, windows, what counts as a failure."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_OVERRIDE_BYTES = 8192
"""A live policy override's JSON: refused on write, ignored on read, above this size."""
_RANGE = re.compile(r"^\s*(\d{3})\s*-\s*(\d{3})\s*$")
_CLASS = re.compile(r"^\s*([1-5])[xX]{2}\s*$")

_INTERNED: dict[frozenset[int], frozenset[int]] = {}

PositiveSeconds = Annotated[float, Field(gt=0, le=86_400)]


def _status_codes(value: Any) -> frozenset[int]:
    """Accept ints, "500-599" ranges and "5xx" classes, alone or in a list."""
    items = value if isinstance(value, list | tuple | set | frozenset) else [value]
    codes: set[int] = set()
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"not a status code: {item!r}")
        if isinstance(item, int):
            low, high = item, item
        elif isinstance(item, str) and (m := _RANGE.match(item)):
            low, high = int(m.group(1)), int(m.group(2))
        elif isinstance(item, str) and (m := _CLASS.match(item)):
            low = int(m.group(1)) * 100
            high = low + 99
        elif isinstance(item, str) and item.strip().isdigit():
            low = high = int(item)
        else:
            raise ValueError(f"not a status code, range (500-599) or class (5xx): {item!r}")
        if not 100 <= low <= high <= 599:
            raise ValueError(f"status codes must lie in 100-599 and ranges ascend: {item!r}")
        codes.update(range(low, high + 1))
    if not codes:
        raise ValueError("at least one status code is needed")
    return frozenset(codes)


def _ranges(codes: frozenset[int]) -> str:
    """`{500, ..., 599, 429}` as `"429,500-599"`."""
    spans: list[list[int]] = []
    for code in sorted(codes):
        if spans and code == spans[-1][1] + 1:
            spans[-1][1] = code
        else:
            spans.append([code, code])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


class Policy(BaseModel):
    """When a service's breaker opens, how long it stays open, and how it probes.

    Every field has a default; `circuit_breaker.defaults` overrides them for all services and a
    service's own entry overrides those.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    failure_threshold: int = Field(5, ge=1, le=1_000_000)
    """Consecutive failures that open the breaker."""
    error_rate_threshold: float = Field(0.5, gt=0, le=1)
    """Failure ratio over the rolling window that opens the breaker (once min_calls are in it)."""
    window_seconds: PositiveSeconds = 10.0
    """Length of the rolling window for the error rate."""
    min_calls: int = Field(20, ge=1, le=1_000_000)
    """Calls that must be in the window before the error rate can open the breaker."""
    timeout_seconds: PositiveSeconds = 10.0
    """Time the breaker stays open before it lets a probe through."""
    max_timeout_seconds: PositiveSeconds | None = None
    """With backoff: each failed probe doubles the open period (less up to 20% jitter) up to
    this; None keeps every open period at timeout_seconds."""
    half_open_max_calls: int = Field(1, ge=1, le=10_000)
    """Probes allowed at once while half-open."""
    probe_lease_seconds: PositiveSeconds = 10.0
    """Longest time a probe holds its half-open slot (in memory and, with Redis, fleet-wide): a
    probe that hangs, or a prober that dies, frees it after this. With slow_call_seconds set,
    that is the deadline instead (a slower probe has failed, and the breaker reopens)."""
    success_threshold: int = Field(1, ge=1, le=10_000)
    """Successful probes that close the breaker."""
    slow_call_seconds: PositiveSeconds | None = None
    """Calls slower than this count as failures; None turns the rule off."""
    failure_status_codes: frozenset[int] = frozenset(range(500, 600))
    """HTTP statuses that count as failures (ints, "500-599" ranges or "5xx" classes)."""
    counting: Literal["fleet", "instance"] = "fleet"
    """With Redis: `fleet` counts every instance's calls for the failure rules (the fleet opens
    on the fleet's evidence); `instance` counts each instance's own calls alone. In memory,
    or while Redis is unreachable, every instance counts alone."""
    quorum: int = Field(1, ge=1, le=10_000)
    """With fleet counting: distinct instances that must have seen failures before the fleet
    opens (with fewer live instances, all of them). Below it an instance whose own failures
    meet the rule opens for itself only."""
    recovery_seconds: PositiveSeconds | None = None
    """After a close, the share of calls let through rises linearly from 0 to 100% over this
    time (on Redis's clock with Redis); the others get 503. None lets every call through."""

    mode: Literal["classic", "adaptive"] = "classic"
    """`classic`: all or nothing (the failure rules open the breaker). `adaptive`: while closed,
    each call is shed with the probability the window's success rate gives (Envoy's
    admission-control formula on the fleet's counts); only the consecutive-failure rule opens."""
    success_rate_target: float = Field(0.95, gt=0, le=1)
    """Adaptive mode: the success rate below which calls are shed; health is the window's
    success rate over it."""
    aggression: float = Field(1.0, ge=1, le=100)
    """Adaptive mode: how steeply the shed share rises as the success rate falls (1: linear)."""
    max_rejection: float = Field(0.8, ge=0, le=1)
    """Adaptive mode: the largest share of calls ever shed."""

    @field_validator("failure_status_codes", mode="before")
    @classmethod
    def _parse_status_codes(cls, value: Any) -> frozenset[int]:
        return _status_codes(value)

    @model_validator(mode="after")
    def _check_backoff(self) -> Policy:
        if self.max_timeout_seconds is not None and self.max_timeout_seconds < self.timeout_seconds:
            raise ValueError("max_timeout_seconds must not be less than timeout_seconds")
        return self

    @field_validator("failure_status_codes", mode="after")
    @classmethod
    def _share_status_codes(cls, value: frozenset[int]) -> frozenset[int]:
        # Every service usually lists the same codes: one shared set, not 8 KB per service.
        return _INTERNED.setdefault(value, value)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            # 100 codes read better as the ranges they were written as.
            yield name, _ranges(value) if name == "failure_status_codes" else value

    def status_code_ranges(self) -> str:
        """`failure_status_codes` as ranges: `"429,500-599"`."""
        return _ranges(self.failure_status_codes)

    def is_failure_status(self, status: int) -> bool:
        return status in self.failure_status_codes


class ServicePolicy(Policy):
    """A configured upstream service: its policy plus where it lives."""

    prefix: str | None = None
    """Route prefix that belongs to the service; `/{name}` when left out."""
    upstream: str | None = None
    """Base URL the example gateway forwards to; unused by the middleware itself."""

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith("/") or "?" in value or "#" in value or "//" in value:
            raise ValueError(f"a prefix is a path starting with '/': {value!r}")
        return value.rstrip("/") or "/"

    @field_validator("upstream")
    @classmethod
    def _check_upstream(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("upstream must be an http:// or https:// URL")
        return value.rstrip("/")
