"""StateStore: where breakers share their state. Knows nothing of HTTP or of breakers' logic."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway_breaker.breaker import BreakerSnapshot
from gateway_breaker.views import InstanceView, TransitionEvent


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Outcome of a compare-and-set write.

    `accepted`: the snapshot was stored as `stored` (with its new version). Otherwise `stored`
    is the newer state another instance wrote (None when the key holds nothing usable).
    """

    accepted: bool
    stored: BreakerSnapshot | None


@dataclass(frozen=True, slots=True)
class EvidenceResult:
    """Outcome of reporting one instance's counts for the fleet's decision.

    `outcome`: `opened` (the fleet opened now; `stored` is the open state written), `stale`
    (the stored state is newer or not closed: `stored`, counts not recorded), `local` (the rule
    holds on this instance's counts alone, below quorum: `cause` says which rule), `counted`.
    The fleet's sums are those the decision saw.
    """

    outcome: str
    stored: BreakerSnapshot | None = None
    cause: str | None = None
    fleet_run: int = 0
    fleet_calls: int = 0
    fleet_failures: int = 0
    failing_instances: int = 0


@dataclass(frozen=True, slots=True)
class Evidence:
    """One instance's counts and the rule they are judged by."""

    instance: str
    run: int
    calls: int
    failures: int
    version: int
    window_seconds: float
    failure_threshold: int
    min_calls: int
    error_rate_threshold: float
    quorum: int


@dataclass(frozen=True, slots=True)
class Invalidated:
    """Keys Redis reports changed since this instance read them: the services whose state or
    policy to read again (`everything`: all of them, say after a FLUSHALL)."""

    states: tuple[str, ...] = ()
    policies: tuple[str, ...] = ()
    everything: bool = False


class StateStore(Protocol):
    """Shared breaker state, one record per service, versioned.

    Every method may raise `StoreError` when the backend cannot be reached; callers keep working
    in memory and try again later.
    """

    @property
    def tracking(self) -> bool:
        """Whether the store reports changes of the keys it read (`Invalidated` events)."""
        ...

    @property
    def per_key_reads(self) -> bool:
        """Whether reading k keys costs k commands (a Cluster), not one."""
        ...

    def describe(self) -> str:
        """Where the store lives, safe to log (no password)."""
        ...

    async def connect(self) -> None:
        """Open connections and check the backend answers."""
        ...

    async def load(self, services: Sequence[str]) -> dict[str, BreakerSnapshot]:
        """Stored states of `services` in one round trip; absent or unusable ones are left out."""
        ...

    def absence_means_reset(self, service: str) -> bool:
        """Whether `service`'s value missing from the last read means someone deleted it
        (not: an unusable value was left out, or a new master after a failover lacks it)."""
        ...

    async def write(
        self, service: str, snapshot: BreakerSnapshot, history: Sequence[TransitionEvent] = ()
    ) -> WriteResult:
        """Store `snapshot` if the stored version is still `snapshot.version` (or absent), and
        append `history` to the service's history in the same atomic step."""
        ...

    async def history(self, service: str, limit: int) -> list[TransitionEvent]:
        """The service's transitions, newest first."""
        ...

    async def load_policies(self, services: Sequence[str]) -> dict[str, dict[str, object]]:
        """Live policy overrides of `services` (absent or unusable ones left out)."""
        ...

    async def load_both(
        self, services: Sequence[str]
    ) -> tuple[dict[str, BreakerSnapshot], dict[str, dict[str, object]]]:
        """`load` and `load_policies` of the same services, in one round trip if it can."""
        ...

    async def write_policy(
        self, service: str, fields: dict[str, object] | None, instance: str
    ) -> None:
        """Store a live policy override (None deletes it) and announce it to the fleet."""
        ...

    async def register(self, instance: InstanceView, ttl: float) -> None:
        """Record this instance as live for `ttl` seconds, with its view of the breakers."""
        ...

    async def heartbeat(self, instance: str, ttl: float) -> int | None:
        """Keep a registered instance live for `ttl` more seconds, in O(1) commands and bytes,
        and count the instances registered within the last `ttl` seconds. None: its record is
        gone; register it again."""
        ...

    async def instances(self) -> list[InstanceView]:
        """Every instance that registered within its ttl."""
        ...

    async def acquire_probe(
        self, service: str, token: str, slots: int, lease_seconds: float, limit: float
    ) -> float:
        """Take one of `slots` fleet-wide half-open probe slots for `lease_seconds`.

        Returns 0.0 when taken, else the seconds until a slot may free up. Bounded by `limit`.
        """
        ...

    async def release_probe(self, service: str, token: str) -> None:
        """Give a probe slot back before its lease runs out."""
        ...

    async def report_evidence(self, service: str, evidence: Evidence) -> EvidenceResult:
        """Store this instance's counts (replacing its last ones), drop contributions older than
        the window, and open the fleet's breaker atomically if the fleet's counts meet the rule
        with `quorum` failing instances and the stored state is still closed."""
        ...

    async def live_instances(self, ttl: float) -> int:
        """How many instances registered within the last `ttl` seconds."""
        ...

    def events(
        self,
    ) -> AsyncIterator[tuple[str, BreakerSnapshot | None] | Invalidated | None]:
        """States as instances write them, `(service, None)` for a policy change, `Invalidated`
        for keys changed past the announcements (tracking); None once
        subscribed (re-read then: anything published while cut off is lost). Raises
        `StoreError` when the subscription breaks."""
        ...

    async def aclose(self) -> None:
        """Close connections. Safe to call twice."""
        ...
